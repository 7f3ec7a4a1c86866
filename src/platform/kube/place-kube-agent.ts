import { dumpYaml, type V1Job } from '@kubernetes/client-node';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { newSessionSecret } from '../../protocol/agent-launch.js';
import type { AgentPlacer } from '../placed-agent.js';
import { kubeApiError, statusCodeOf } from './api-errors.js';
import { startAgentJob } from './agent-job-runner.js';
import {
  AGENT_PORT,
  agentJobManifest,
  agentSecretManifest,
  defaultAgentImage,
  type PullPolicy,
} from './agent-job.js';
import {
  KubeError,
  loadKubeAccess,
  type KubeAccess,
  type KubeAccessOptions,
} from './kubeconfig.js';
import { openPortForward } from './port-forward.js';
import type { TargetKind } from './target-kinds.js';
import { describePod, pickPod, type MirroredPod } from './targets.js';

export interface KubeAgentOptions {
  kube: KubeAccessOptions;
  target: { kind: TargetKind; name: string; container?: string };
  agent: {
    /** Default: the agent image of this version (defaultAgentImage). */
    image?: string;
    pullPolicy?: PullPolicy;
    pullSecrets: string[];
    capabilities: boolean;
    ttlSeconds: number;
    idleTimeoutSeconds: number;
    startupTimeoutSeconds: number;
  };
  /** Aborted when the user interrupts: a start in progress stops and removes what it made. */
  signal?: AbortSignal;
}

/** The cluster, the resolved target and the Job that would run the agent next to it. */
export interface AgentJobPlan {
  access: KubeAccess;
  target: MirroredPod;
  job: V1Job;
}

/** Resolves the target (the Job needs its node and container ID) and builds the agent's Job. */
export async function planAgentJob(
  options: KubeAgentOptions,
  progress: (note: string) => void = () => undefined,
): Promise<AgentJobPlan> {
  const access = loadKubeAccess(options.kube);
  const { kind, name, container } = options.target;
  progress(
    `resolving ${kind}/${name} in namespace ${access.namespace} (context ${access.context})`,
  );
  const target = await pickPod(access, {
    kind,
    name,
    namespace: access.namespace,
    ...(container ? { container } : {}),
  });
  const job = agentJobManifest({
    sessionId: randomBytes(4).toString('hex'),
    namespace: target.namespace,
    node: target.node,
    containerId: target.containerId,
    target: describePod(target),
    image: options.agent.image ?? defaultAgentImage(),
    ...(options.agent.pullPolicy ? { pullPolicy: options.agent.pullPolicy } : {}),
    pullSecrets: options.agent.pullSecrets,
    capabilities: options.agent.capabilities,
    ttlSeconds: options.agent.ttlSeconds,
    idleTimeoutSeconds: options.agent.idleTimeoutSeconds,
    cli: { host: hostname(), pid: process.pid },
  });
  return { access, target, job };
}

/**
 * `mirror --dry-run`: the Job the session would create and then its Secret, as two YAML
 * documents; nothing is created. The Secret is printed without its data and its owner: the
 * session secret is made at each start (one printed here would never be used, and a secret has
 * no business in a terminal or a CI log), and the owner reference needs the uid the API server
 * gives the Job.
 */
export async function agentJobYaml(options: KubeAgentOptions): Promise<string> {
  const { job } = await planAgentJob(options);
  return `${dumpYaml(job)}---\n${dumpYaml(agentSecretManifest(job))}`;
}

/** How often a replaced target's workload is asked for a ready pod. */
const REPLACEMENT_POLL_MS = 1000;

/**
 * The plan for an agent next to the replacement of the `gone` pod: the workload's newest ready
 * pod other than it, asked for until one is ready or the startup timeout passes (a rollout, a
 * ReplicaSet or a StatefulSet takes seconds to start and ready a pod).
 */
async function planReplacement(
  options: KubeAgentOptions,
  gone: MirroredPod,
  progress: (note: string) => void,
): Promise<AgentJobPlan> {
  const gonePod = gone.pod;
  const { kind, name } = options.target;
  const seconds = options.agent.startupTimeoutSeconds;
  const deadline = Date.now() + seconds * 1000;
  progress(`waiting for a ready pod of ${kind}/${name} to replace pod ${gonePod}`);
  for (;;) {
    let why: string;
    try {
      const plan = await planAgentJob(options);
      // By container, not by name: a StatefulSet's replacement has the gone pod's name.
      if (plan.target.containerId !== gone.containerId) return plan;
      why = `pod ${gonePod} is still its newest ready pod`;
    } catch (error) {
      // Anything else than "no ready pod yet" (a deleted workload, no access) will not pass.
      if (!(error instanceof KubeError) || !/has no running, ready pod/.test(error.message)) {
        throw error;
      }
      why = error.message;
    }
    if (options.signal?.aborted) {
      throw Object.assign(new KubeError('interrupted while waiting for the replacement pod'), {
        oclif: { exit: 130 },
      });
    }
    if (Date.now() >= deadline) {
      throw new KubeError(
        `no pod of ${kind}/${name} replaced pod ${gonePod} within ${seconds} s (${why}): the session ended; raise --agent-startup-timeout to wait longer`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, REPLACEMENT_POLL_MS));
  }
}

/**
 * The kube platform's placer: the agent as a Job on the target's node, reached through a
 * port-forward to its fixed port, admitting only this CLI (the session secret, handed over in a
 * Secret the Job owns). stop() deletes the Job (propagation Background). A workload's
 * agent is replaceable: when its pod goes away, the next agent goes next to the pod that
 * replaced it (on that pod's node).
 */
export function placeKubeAgent(options: KubeAgentOptions): AgentPlacer {
  const replaceable = options.target.kind !== 'pod';
  let placed: MirroredPod | undefined;
  return async (progress, replacing) => {
    const { access, target, job } =
      replacing && placed
        ? await planReplacement(options, placed, progress)
        : await planAgentJob(options, progress);
    placed = target;
    // Each agent its own: a replacement agent does not admit the secret of the one before.
    const secret = newSessionSecret();
    const agent = await startAgentJob({
      access,
      job,
      secret,
      startupTimeoutMs: options.agent.startupTimeoutSeconds * 1000,
      progress,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    progress(`connecting to the agent (pod ${agent.namespace}/${agent.pod})`);
    return {
      target: describePod(target),
      replaceable,
      secret,
      async connect() {
        try {
          return await openPortForward(access.config, agent.namespace, agent.pod, AGENT_PORT);
        } catch (error) {
          if (statusCodeOf(error) !== 403) throw error;
          const action = {
            verb: 'create',
            resource: 'pods/portforward',
            namespace: agent.namespace,
          } as const;
          throw kubeApiError(error, action, access);
        }
      },
      stop: agent.remove,
    };
  };
}

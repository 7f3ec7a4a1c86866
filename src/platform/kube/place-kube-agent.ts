import { dumpYaml, type V1Job } from '@kubernetes/client-node';
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { AgentPlacer } from '../placed-agent.js';
import { kubeApiError, statusCodeOf } from './api-errors.js';
import { startAgentJob } from './agent-job-runner.js';
import { AGENT_PORT, agentJobManifest, defaultAgentImage, type PullPolicy } from './agent-job.js';
import { loadKubeAccess, type KubeAccess, type KubeAccessOptions } from './kubeconfig.js';
import { openPortForward } from './port-forward.js';
import { describeTarget, resolveTarget, type ResolvedTarget, type TargetKind } from './targets.js';

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
  target: ResolvedTarget;
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
  const target = await resolveTarget(access, {
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
    target: describeTarget(target),
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

/** `mirror --dry-run`: the Job the session would create, as YAML; nothing is created. */
export async function agentJobYaml(options: KubeAgentOptions): Promise<string> {
  const { job } = await planAgentJob(options);
  return dumpYaml(job);
}

/**
 * The kube platform's placer: the agent as a Job on the target's node, reached through a
 * port-forward to its fixed port. stop() deletes the Job (propagation Background).
 */
export function placeKubeAgent(options: KubeAgentOptions): AgentPlacer {
  return async (progress) => {
    const { access, target, job } = await planAgentJob(options, progress);
    const agent = await startAgentJob({
      access,
      job,
      startupTimeoutMs: options.agent.startupTimeoutSeconds * 1000,
      progress,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    progress(`connecting to the agent (pod ${agent.namespace}/${agent.pod})`);
    return {
      target: describeTarget(target),
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

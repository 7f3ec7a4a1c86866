/**
 * The flags that name a target and say how to place its agent, shared by every command that
 * places one (`mirror`, `env`), and their resolution with mirrord.json into an agent placer.
 */
import { Flags } from '@oclif/core';
import { placeLocalAgent } from '../platform/local/agent-process.js';
import type { AgentPlacer } from '../platform/placed-agent.js';
import { AGENT_DEFAULTS, PULL_POLICIES } from '../platform/kube/agent-job.js';
import { UsageError } from './base-command.js';
import { clusterFlags, kubeName } from './cluster-flags.js';
import { CONFIG_FILE, KUBE_ONLY_KEYS, configFileName, type MirrorConfig } from './config.js';
import {
  KUBE_ONLY_FLAGS,
  TARGET_FLAGS,
  kubeAgentOptions,
  targetOf,
  type KubeFlags,
  type Target,
} from './mirror-settings.js';

const KUBE = 'KUBERNETES';
const AGENT = 'AGENT (KUBERNETES)';

export const targetFlags = {
  pid: Flags.integer({
    summary: 'The target is this local process (mirrored: its network namespace).',
    helpValue: 'PID',
    min: 1,
  }),
  netns: Flags.string({
    summary: 'The target is this named network namespace (ip netns).',
    helpValue: 'NAME',
  }),
  pod: kubeName({
    summary: 'The target is this pod.',
    helpValue: 'NAME',
    helpGroup: KUBE,
  }),
  deployment: kubeName({
    summary: 'The target is the newest running, ready pod of this deployment.',
    helpValue: 'NAME',
    helpGroup: KUBE,
  }),
  statefulset: kubeName({
    summary: 'The target is the newest running, ready pod of this statefulset.',
    helpValue: 'NAME',
    helpGroup: KUBE,
  }),
  container: kubeName({
    summary: "The pod's container (default: the first that is not a mesh sidecar).",
    helpValue: 'NAME',
    helpGroup: KUBE,
  }),
  namespace: kubeName({
    char: 'n',
    summary: "The target's namespace (default: the context's, else default).",
    helpValue: 'NAME',
    helpGroup: KUBE,
  }),
  ...clusterFlags(KUBE),
  'agent-image': Flags.string({
    summary: 'The agent image (default: the agent image of this version).',
    helpValue: 'IMAGE',
    helpGroup: AGENT,
  }),
  'agent-pull-policy': Flags.option({
    summary: "The agent image's pull policy (default: the cluster's).",
    options: PULL_POLICIES,
    helpGroup: AGENT,
  })(),
  'agent-pull-secret': kubeName({
    summary: 'An image pull secret for the agent image (repeatable).',
    helpValue: 'NAME',
    multiple: true,
    helpGroup: AGENT,
  }),
  'agent-privileged': Flags.boolean({
    summary:
      'Run the agent privileged, where a cluster does not grant the capabilities it asks for by default.',
    helpGroup: AGENT,
  }),
  'agent-ttl': Flags.integer({
    summary: `Seconds Kubernetes keeps the finished agent Job (default: ${AGENT_DEFAULTS.ttlSeconds}).`,
    helpValue: 'SECONDS',
    min: 0,
    helpGroup: AGENT,
  }),
  'agent-idle-timeout': Flags.integer({
    summary: `Seconds the agent waits for its session before it exits (default: ${AGENT_DEFAULTS.idleTimeoutSeconds}).`,
    helpValue: 'SECONDS',
    min: 1,
    helpGroup: AGENT,
  }),
  'agent-startup-timeout': Flags.integer({
    summary: `Seconds to wait for the agent to start (default: ${AGENT_DEFAULTS.startupTimeoutSeconds}).`,
    helpValue: 'SECONDS',
    min: 1,
    helpGroup: AGENT,
  }),
};

/** The target flags as oclif parses them. */
export type TargetFlags = KubeFlags & {
  pid?: number;
  netns?: string;
  pod?: string;
  deployment?: string;
  statefulset?: string;
  config?: string;
};

/**
 * The one target named by the flags, else by mirrord.json; refuses none, two, and settings
 * that do not apply to it.
 */
export function resolveTarget(flags: TargetFlags, config: MirrorConfig): Target {
  const targetFlags = TARGET_FLAGS.filter((flag) => flags[flag] !== undefined);
  if (targetFlags.length > 1) {
    throw new UsageError(
      `give one target, not ${targetFlags.map((flag) => `--${flag}`).join(' and ')}`,
    );
  }
  const target = targetOf(flags) ?? targetOf(config);
  if (!target) {
    throw new UsageError(
      `no target: give --pod, --deployment, --statefulset, --pid or --netns (or the same key in ${CONFIG_FILE})`,
    );
  }
  if ('local' in target) {
    const given = flags as Record<string, unknown>;
    const kubeFlag = KUBE_ONLY_FLAGS.find((flag) => given[flag] !== undefined);
    if (kubeFlag) {
      throw new UsageError(
        `--${kubeFlag} applies to Kubernetes targets (--pod, --deployment, --statefulset), not to --pid or --netns`,
      );
    }
    // From a file that names no target: ignored here, as the flags would be, so refused.
    const kubeKey = KUBE_ONLY_KEYS.find((key) => config[key] !== undefined);
    if (kubeKey) {
      throw new UsageError(
        `${configFileName(flags.config)}: "${kubeKey}" applies to Kubernetes targets (pod, deployment, statefulset), not to --pid or --netns`,
      );
    }
  }
  return target;
}

/** Places the target's agent: a Job on its node, or a process here. */
export async function agentPlacer(
  target: Target,
  flags: TargetFlags,
  config: MirrorConfig,
  signal: AbortSignal,
): Promise<AgentPlacer> {
  if ('local' in target) return placeLocalAgent(target.local);
  const kube = await import('../platform/kube/place-kube-agent.js');
  return kube.placeKubeAgent(kubeAgentOptions(target.kube, flags, config, signal));
}

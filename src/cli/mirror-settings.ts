/**
 * Turns the `mirror` command's flags and mirrord.json into a session's settings: which target,
 * which ports, and for a Kubernetes target everything the agent Job needs. Flags win over the
 * file, the file over the defaults.
 */
import type { TargetSpec } from '../protocol/agent-launch.js';
import type { KubeAgentOptions } from '../platform/kube/place-kube-agent.js';
import { kubeAccessOptions } from './cluster-flags.js';
import type { MirrorConfig } from './config.js';

/** The Kubernetes flags, as oclif parses them. */
export interface KubeFlags {
  container?: string;
  namespace?: string;
  context?: string;
  kubeconfig?: string;
  'request-timeout'?: number;
  'agent-image'?: string;
  'agent-pull-policy'?: 'Always' | 'IfNotPresent' | 'Never';
  'agent-pull-secret'?: string[];
  'agent-capabilities'?: boolean;
  'agent-ttl'?: number;
  'agent-idle-timeout'?: number;
  'agent-startup-timeout'?: number;
}

/** `REMOTE` or `REMOTE:LOCAL`, each a port. */
export function parsePortMapping(value: string): [number, number] {
  const match = /^(\d{1,5})(?::(\d{1,5}))?$/.exec(value);
  const remote = Number(match?.[1]);
  const local = Number(match?.[2] ?? match?.[1]);
  if (!match || !(remote >= 1 && remote <= 65535) || !(local >= 1 && local <= 65535)) {
    throw new Error(`--port "${value}" is not REMOTE[:LOCAL] with ports from 1 to 65535`);
  }
  return [remote, local];
}

export type Target = { local: TargetSpec } | { kube: KubeAgentOptions['target'] };

/** A target named by flags or by the config file, which hold the same keys. */
export function targetOf(
  settings: Pick<MirrorConfig, 'pid' | 'netns' | KubeKind>,
): Target | undefined {
  if (settings.pid !== undefined) return { local: { pid: settings.pid } };
  if (settings.netns !== undefined) return { local: { netns: settings.netns } };
  for (const kind of KUBE_KINDS) {
    const name = settings[kind];
    if (name !== undefined) return { kube: { kind, name } };
  }
  return undefined;
}

export const KUBE_KINDS = ['pod', 'deployment', 'statefulset'] as const;
type KubeKind = (typeof KUBE_KINDS)[number];
export const TARGET_FLAGS = ['pid', 'netns', ...KUBE_KINDS] as const;
/** Flags that only mean something for a Kubernetes target. */
export const KUBE_ONLY_FLAGS = [
  'container',
  'namespace',
  'context',
  'kubeconfig',
  'agent-image',
  'agent-pull-policy',
  'agent-pull-secret',
  'agent-capabilities',
  'agent-ttl',
  'agent-idle-timeout',
  'agent-startup-timeout',
  'request-timeout',
  'dry-run',
] as const;

/** The Kubernetes settings of a session: flags, else mirrord.json, else the defaults. */
export function kubeAgentOptions(
  target: KubeAgentOptions['target'],
  flags: KubeFlags,
  config: MirrorConfig,
  signal: AbortSignal,
): KubeAgentOptions {
  const container = flags.container ?? config.container;
  return {
    kube: kubeAccessOptions({
      kubeconfig: flags.kubeconfig ?? config.kubeconfig,
      context: flags.context ?? config.context,
      namespace: flags.namespace ?? config.namespace,
      'request-timeout': flags['request-timeout'] ?? config.requestTimeout,
    }),
    target: { ...target, ...(container ? { container } : {}) },
    agent: {
      image: flags['agent-image'] ?? config.agentImage,
      pullPolicy: flags['agent-pull-policy'] ?? config.agentPullPolicy,
      pullSecrets: flags['agent-pull-secret'] ?? config.agentPullSecrets ?? [],
      capabilities: flags['agent-capabilities'] ?? config.agentCapabilities ?? false,
      ttlSeconds: flags['agent-ttl'] ?? config.agentTtl ?? 60,
      idleTimeoutSeconds: flags['agent-idle-timeout'] ?? config.agentIdleTimeout ?? 30,
      startupTimeoutSeconds: flags['agent-startup-timeout'] ?? config.agentStartupTimeout ?? 60,
    },
    signal,
  };
}

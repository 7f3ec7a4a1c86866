/**
 * Turns the `mirror` command's flags and mirrord.json into a session's settings: which target,
 * which ports, and for a Kubernetes target everything the agent Job needs. Flags win over the
 * file, the file over the defaults.
 */
import { accessSync, constants, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { NodeTarget } from '../protocol/agent-launch.js';
import { AGENT_DEFAULTS, type PullPolicy } from '../platform/kube/agent-job.js';
import type { KubeAgentOptions } from '../platform/kube/place-kube-agent.js';
import type { TargetKind } from '../platform/kube/target-kinds.js';
import { kubeAccessOptions } from './cluster-flags.js';
import {
  KUBE_ONLY_KEYS,
  KUBE_TARGET_KEYS,
  LOCAL_TARGET_KEYS,
  flagOf,
  type MirrorConfig,
} from './config.js';

/** The Kubernetes flags, as oclif parses them. */
export interface KubeFlags {
  container?: string;
  namespace?: string;
  context?: string;
  kubeconfig?: string;
  'request-timeout'?: number;
  'agent-image'?: string;
  'agent-pull-policy'?: PullPolicy;
  'agent-pull-secret'?: string[];
  'agent-privileged'?: boolean;
  'agent-ttl'?: number;
  'agent-idle-timeout'?: number;
  'agent-startup-timeout'?: number;
}

export type Target = { local: NodeTarget } | { kube: KubeAgentOptions['target'] };

/** A target named by flags or by the config file, which hold the same keys. */
export function targetOf(
  settings: Pick<MirrorConfig, 'pid' | 'netns' | TargetKind>,
): Target | undefined {
  if (settings.pid !== undefined) return { local: { pid: settings.pid } };
  if (settings.netns !== undefined) return { local: { netns: settings.netns } };
  for (const kind of KUBE_TARGET_KEYS) {
    const name = settings[kind];
    if (name !== undefined) return { kube: { kind, name } };
  }
  return undefined;
}

/**
 * The name of the network namespace a `--netns` target is: a bare namespace, with no process
 * and so no environment or file system of its own; undefined for every other target.
 */
export function bareNetns(target: Target): string | undefined {
  return 'local' in target && 'netns' in target.local ? target.local.netns : undefined;
}

/** The flags that name a target: the same as their mirrord.json keys. */
export const TARGET_FLAGS = [...LOCAL_TARGET_KEYS, ...KUBE_TARGET_KEYS] as const;
/** Flags that only mean something for a Kubernetes target. */
export const KUBE_ONLY_FLAGS = [...KUBE_ONLY_KEYS.map(flagOf), 'dry-run'];

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
      // Least privilege unless asked: the capabilities the agent needs, not a privileged container.
      capabilities: !(flags['agent-privileged'] ?? config.agentPrivileged ?? false),
      ttlSeconds: flags['agent-ttl'] ?? config.agentTtl ?? AGENT_DEFAULTS.ttlSeconds,
      idleTimeoutSeconds:
        flags['agent-idle-timeout'] ?? config.agentIdleTimeout ?? AGENT_DEFAULTS.idleTimeoutSeconds,
      startupTimeoutSeconds:
        flags['agent-startup-timeout'] ??
        config.agentStartupTimeout ??
        AGENT_DEFAULTS.startupTimeoutSeconds,
    },
    signal,
  };
}

type Program = 'runnable' | 'missing' | 'a directory' | 'not executable';

function programAt(path: string): Program {
  try {
    if (statSync(path).isDirectory()) return 'a directory';
  } catch {
    return 'missing';
  }
  try {
    accessSync(path, constants.X_OK);
    return 'runnable';
  } catch {
    return 'not executable';
  }
}

/**
 * The files execvp tries for `file`, in order: a name with a slash as it is, any other in each
 * directory of PATH.
 */
function candidatesOf(file: string, path: string): string[] {
  if (file.includes('/')) return [file];
  // An empty entry is the working directory, for execvp as for a shell.
  return path.split(':').map((dir) => join(dir || '.', file));
}

/**
 * The file execvp runs for `file` (see commandProblem), or undefined when none can run: what
 * COMMAND really is, for a look inside it (src/cli/unhookable.ts).
 */
export function commandPath(
  file: string,
  path = process.env.PATH ?? '/bin:/usr/bin',
): string | undefined {
  if (file === '') return undefined;
  return candidatesOf(file, path).find((candidate) => programAt(candidate) === 'runnable');
}

/**
 * Why COMMAND cannot be started, or undefined when it can: looked for as execvp looks for it (a
 * name with a slash as it is, any other in the directories of PATH, the first one that can run).
 * Checked before an agent is placed, which on a cluster takes a Job, a pod and a port-forward.
 */
export function commandProblem(
  file: string,
  path = process.env.PATH ?? '/bin:/usr/bin',
): string | undefined {
  if (file === '') return 'COMMAND is empty: give the program to run after --';
  const fix: Record<Exclude<Program, 'runnable' | 'missing'>, string> = {
    'a directory': 'give the program to run after --',
    'not executable': 'make it executable (chmod +x) or run it with its interpreter',
  };
  if (file.includes('/')) {
    const found = programAt(file);
    if (found === 'runnable') return undefined;
    if (found === 'missing') return `COMMAND ${file} does not exist: check the path`;
    return `COMMAND ${file} is ${found}: ${fix[found]}`;
  }
  let unusable: string | undefined;
  for (const candidate of candidatesOf(file, path)) {
    const found = programAt(candidate);
    if (found === 'runnable') return undefined;
    if (found !== 'missing') {
      unusable ??= `COMMAND ${file} (${candidate}) is ${found}: ${fix[found]}`;
    }
  }
  return unusable ?? `command not found: ${file} (not in PATH): check the name, or give its path`;
}

/** The capabilities a local target's agent needs, by their bit in CapEff. */
const AGENT_CAPABILITIES = { CAP_NET_ADMIN: 12n, CAP_SYS_ADMIN: 21n };

/**
 * Why this process cannot mirror a local target, or undefined when it can: the agent it starts
 * as its child loads BPF and enters the target's netns (CAP_SYS_ADMIN, which also covers
 * CAP_BPF) and attaches to its interfaces (CAP_NET_ADMIN). The same line for `mirror` and
 * `demo`, said before anything is started. `mirrord doctor` tells the whole story.
 */
export function localPrivilegesProblem(
  status = readFileSync('/proc/self/status', 'utf8'),
): string | undefined {
  const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
  // Unknown here: the agent says what it lacks when it fails.
  if (hex === undefined) return undefined;
  const effective = BigInt(`0x${hex}`);
  const missing = Object.entries(AGENT_CAPABILITIES)
    .filter(([, bit]) => ((effective >> bit) & 1n) === 0n)
    .map(([name]) => name);
  if (missing.length === 0) return undefined;
  return `mirroring a local target needs root (this process lacks ${missing.join(' and ')}): run it with sudo`;
}

/**
 * What a launcher and the agent process say to each other outside the session: the target the
 * agent is started for (its command-line flags), the session secret, the readiness line it
 * prints when it listens, and the one-line error it prints when it cannot start. The same
 * wherever the agent runs (a child process here, a Job's pod log in a cluster).
 */
import { randomBytes } from 'node:crypto';

/**
 * A target as it is named on its node, the form an agent is started with: a process, a named
 * netns, or a container of a pod. ("Target" is always what the user mirrors; KubeTarget is its
 * Kubernetes form, MirroredPod the pod it stands for now, TapNetns where the tap attaches,
 * ReplayDestination the local app's listener.)
 */
export type NodeTarget = { pid: number } | { netns: string } | { containerId: string };

/** The agent's flags that name its target. */
export function targetArgs(target: NodeTarget): string[] {
  if ('pid' in target) return ['--pid', String(target.pid)];
  if ('netns' in target) return ['--netns', target.netns];
  return ['--container-id', target.containerId];
}

/** The one line the agent prints when it listens: what launchers wait for. */
export interface AgentReadiness {
  ready: true;
  address: string;
  port: number;
  target: string;
  interfaces: string[];
  attachMode: 'tcx' | 'tc';
}

export function readinessOf(line: string): AgentReadiness | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    const parsed = JSON.parse(line) as AgentReadiness;
    return parsed.ready === true ? parsed : undefined;
  } catch {
    return undefined;
  }
}

/** The agent's own error line among what it printed, without the `mirrord: ` prefix. */
export function agentErrorOf(lines: string[]): string | undefined {
  return lines.findLast((line) => line.startsWith('mirrord: '))?.slice('mirrord: '.length);
}

/**
 * The environment variable a local agent finds its session secret in. The environment, not
 * argv: /proc/PID/environ is readable only by the process's own user (root here), where
 * /proc/PID/cmdline is readable by every user. In a cluster the secret is a file mounted from a
 * Secret the agent's Job owns (`--secret-file`), since a Job's spec is shown to anyone allowed
 * `get jobs`.
 */
export const SECRET_ENV = 'MIRRORD_AGENT_SECRET';

/** A new session secret: 256 random bits, as text that fits an environment variable or a file. */
export function newSessionSecret(): string {
  return randomBytes(32).toString('base64url');
}

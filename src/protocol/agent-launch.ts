/**
 * What a launcher and the agent process say to each other outside the session: the target the
 * agent is started for (its command-line flags), the readiness line it prints when it listens,
 * and the one-line error it prints when it cannot start. The same wherever the agent runs (a
 * child process here, a Job's pod log in a cluster).
 */

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

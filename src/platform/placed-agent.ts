import type { Duplex } from 'node:stream';

/**
 * An agent that a platform brought next to a target and can open the session's byte stream to:
 * a child process on this machine (`local`), or a Job on the target's node reached through a
 * port-forward (`kube`). The session needs nothing else from a platform.
 */
export interface PlacedAgent {
  /** What is mirrored, as the user should read it (e.g. `netns staging`, `pod default/api-7f9`). */
  readonly target: string;
  /**
   * Whether the platform can place an agent next to the target's replacement when the target
   * goes away: true for a workload's pod (the workload starts another), false for a pod named
   * by the user or a local process or netns (nothing replaces them).
   */
  readonly replaceable: boolean;
  /** What the session presents to be admitted: only the placer knows it (src/protocol/agent-launch.ts). */
  readonly secret: string;
  /** Opens the agent's one session stream. */
  connect(): Promise<Duplex>;
  /** Removes everything the platform created for this agent; safe to call more than once. */
  stop(): Promise<void>;
}

/**
 * Brings an agent next to the target; `progress` gets short notes while that takes time. With
 * `replacing` (a replaceable agent whose target went away), next to the target's replacement,
 * waiting for it to be ready.
 */
export type AgentPlacer = (
  progress: (note: string) => void,
  replacing?: PlacedAgent,
) => Promise<PlacedAgent>;

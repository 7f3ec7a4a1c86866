/**
 * The features an agent serves besides mirroring, by the name a `request` gives: each answers
 * a request's body with its reply's body, or throws an Error whose message the CLI shows.
 */
import type { WireValue } from '../protocol/messages.js';
import { targetEnvironment } from './env/agent.js';
import { ENV_FEATURE, envReplyBody } from './env/messages.js';
import { TargetFiles } from './files/agent.js';
import { FILES_FEATURE, fileReplyBody, parseFileRequest } from './files/messages.js';
import type { Streams } from '../protocol/streams.js';
import { TargetOutgoing } from './outgoing/agent.js';
import { OUTGOING_FEATURE, parseOutgoingRequest } from './outgoing/messages.js';

export interface AgentFeature {
  serve(body: WireValue): Promise<WireValue>;
  /** Releases what the session held (open files); the agent serves one session. */
  close?(): Promise<void>;
  /**
   * Requests served at once (default: the host's few). A feature whose requests wait on the
   * network, not on this machine, and whose replies are small, takes many.
   */
  inFlight?: number;
}

/** What the features need to know of the target. */
export interface FeatureTarget {
  /** A process of the target, when it has one (a bare network namespace has none). */
  pid?: number;
  /** The target's named network namespace, when it is one. */
  netns?: string;
  /** How the user knows it, for messages. */
  name: string;
}

/**
 * `warn`: a line for the session (a refused path), which goes on; `streams`: the session's
 * streams, which outgoing connections join.
 */
export function agentFeatures(
  target: FeatureTarget,
  warn: (code: string, message: string) => void,
  streams: () => Streams,
): Map<string, AgentFeature> {
  const targetPid = (): number => {
    if (target.pid === undefined) {
      throw new Error(`${target.name} is a network namespace: it has no process to take this from`);
    }
    return target.pid;
  };
  let files: TargetFiles | undefined;
  let outgoing: TargetOutgoing | undefined;
  const outgoingTarget = (): { pid: number } | { netns: string } =>
    target.netns !== undefined ? { netns: target.netns } : { pid: targetPid() };
  return new Map<string, AgentFeature>([
    [ENV_FEATURE, { serve: async () => envReplyBody(await targetEnvironment(targetPid())) }],
    [
      FILES_FEATURE,
      {
        serve: async (body) => {
          const request = parseFileRequest(body);
          files ??= new TargetFiles(targetPid(), (message) => warn(FILES_FEATURE, message));
          return fileReplyBody(request.op, await files.serve(request));
        },
        close: async () => files?.close(),
      },
    ],
    [
      OUTGOING_FEATURE,
      {
        // A connect waits for the target's network, up to its SYN timeout: an app opening
        // hundreds of connections at once must not have them wait in line.
        inFlight: 4096,
        serve: async (body) => {
          const request = parseOutgoingRequest(body);
          outgoing ??= new TargetOutgoing(outgoingTarget(), streams);
          return outgoing.serve(request);
        },
        close: async () => outgoing?.close(),
      },
    ],
  ]);
}

/**
 * The features an agent serves besides mirroring, by the name a `request` gives: each answers
 * a request's body with its reply's body, or throws an Error whose message the CLI shows.
 */
import type { WireValue } from '../protocol/messages.js';
import { targetEnvironment } from './env/agent.js';
import { ENV_FEATURE, envReplyBody } from './env/messages.js';
import { TargetFiles } from './files/agent.js';
import { FILES_FEATURE, fileReplyBody, parseFileRequest } from './files/messages.js';
import type { TapNetns } from '../agent/tap.js';
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
  /** Its network namespace: a process's, or a bare named one (which has no process). */
  netns: TapNetns;
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
    if (!('pid' in target.netns)) {
      throw new Error(`${target.name} is a network namespace: it has no process to take this from`);
    }
    return target.netns.pid;
  };
  let files: TargetFiles | undefined;
  let outgoing: TargetOutgoing | undefined;
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
          outgoing ??= new TargetOutgoing(target.netns, streams);
          return outgoing.serve(request);
        },
        close: async () => outgoing?.close(),
      },
    ],
  ]);
}

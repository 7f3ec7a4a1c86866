/**
 * The features an agent serves besides mirroring, by the name a `request` gives: each answers
 * a request's body with its reply's body, or throws an Error whose message the CLI shows.
 */
import type { WireValue } from '../protocol/messages.js';
import { targetEnvironment } from './env/agent.js';
import { ENV_FEATURE, envReplyBody } from './env/messages.js';

export type FeatureHandler = (body: WireValue) => Promise<WireValue>;

/** What the features need to know of the target. */
export interface FeatureTarget {
  /** A process of the target, when it has one (a bare network namespace has none). */
  pid?: number;
  /** How the user knows it, for messages. */
  name: string;
}

export function agentFeatures(target: FeatureTarget): Map<string, FeatureHandler> {
  const process = (): number => {
    if (target.pid === undefined) {
      throw new Error(`${target.name} is a network namespace: it has no process to take this from`);
    }
    return target.pid;
  };
  return new Map<string, FeatureHandler>([
    [ENV_FEATURE, async () => envReplyBody(await targetEnvironment(process()))],
  ]);
}

/**
 * Serves a session's feature requests (see agent.ts) so that they never crowd out mirroring:
 * a few at a time, and each reply waits while the session's socket is behind. A file's
 * contents come in replies of up to a MiB, and a burst of them (an app opening a thousand
 * files at once) would otherwise fill the socket until the tap paused and the ring overflowed,
 * dropping mirrored bytes, or until the session hit its backlog limit and ended.
 */
import type { WireValue } from '../protocol/messages.js';
import type { AgentFeature } from './agent.js';

/** The part of the agent's session the host needs (AgentSession). */
export interface FeatureSession {
  reply(id: number, body: WireValue): void;
  failRequest(id: number, error: string): void;
  readonly backlogBytes: number;
  once(event: 'drain', listener: () => void): unknown;
}

/**
 * Requests of a feature served at once, unless it says otherwise: enough to overlap a few slow
 * reads, few enough to bound memory.
 */
const IN_FLIGHT = 8;
/** Requests that may wait; past this a client is flooding, and is told so per request. */
const MAX_WAITING = 4096;
/**
 * A reply is written only while less than this waits in the socket: the tap pauses at 1 MiB
 * (src/features/mirror/agent.ts), so replies never make it pause by themselves.
 */
const REPLY_BELOW_BYTES = 512 * 1024;

interface Request {
  id: number;
  feature: string;
  body: WireValue;
}

export class FeatureHost {
  readonly #features: ReadonlyMap<string, AgentFeature>;
  readonly #session: FeatureSession;
  readonly #waiting: Request[] = [];
  /** Requests being served, by feature. */
  readonly #inFlight = new Map<string, number>();
  #closed = false;

  constructor(features: ReadonlyMap<string, AgentFeature>, session: FeatureSession) {
    this.#features = features;
    this.#session = session;
  }

  request(id: number, feature: string, body: WireValue): void {
    if (this.#waiting.length >= MAX_WAITING) {
      this.#session.failRequest(id, `more than ${MAX_WAITING} requests wait: ask fewer at once`);
      return;
    }
    this.#waiting.push({ id, feature, body });
    this.#pump();
  }

  /** The session is over: nothing more is served, and the features release what they hold. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#waiting.length = 0;
    await Promise.all([...this.#features.values()].map((feature) => feature.close?.()));
  }

  /** Starts the waiting requests whose feature has room, in order within each feature. */
  #pump(): void {
    if (this.#closed) return;
    const full = new Set<string>();
    for (let i = 0; i < this.#waiting.length;) {
      const request = this.#waiting[i]!;
      const serving = this.#inFlight.get(request.feature) ?? 0;
      if (full.has(request.feature) || serving >= this.#limitOf(request.feature)) {
        full.add(request.feature);
        i += 1;
        continue;
      }
      this.#waiting.splice(i, 1);
      this.#inFlight.set(request.feature, serving + 1);
      void this.#serve(request).finally(() => {
        this.#inFlight.set(request.feature, (this.#inFlight.get(request.feature) ?? 1) - 1);
        this.#pump();
      });
    }
  }

  #limitOf(feature: string): number {
    return this.#features.get(feature)?.inFlight ?? IN_FLIGHT;
  }

  async #serve({ id, feature, body }: Request): Promise<void> {
    const handler = this.#features.get(feature);
    if (!handler) {
      this.#session.failRequest(id, `this agent serves no feature "${feature}"`);
      return;
    }
    let reply: WireValue;
    try {
      reply = await handler.serve(body);
    } catch (error) {
      this.#session.failRequest(id, (error as Error).message);
      return;
    }
    while (!this.#closed && this.#session.backlogBytes >= REPLY_BELOW_BYTES) {
      await new Promise<void>((resolve) => this.#session.once('drain', resolve));
    }
    if (!this.#closed) this.#session.reply(id, reply);
  }
}

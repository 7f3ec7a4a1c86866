import type { MirrorEvent } from '../features/mirror/cli.js';

type Totals = Extract<MirrorEvent, { event: 'counters' }>;

/** What the demo's session did, from its events: connections still open, and the totals. */
export class MirrorTally {
  readonly #open = new Set<number>();
  #closed = 0;
  #totals: Totals | undefined;

  record(event: MirrorEvent): void {
    if (event.event === 'opened') this.#open.add(event.id);
    else if (event.event === 'closed') {
      this.#open.delete(event.id);
      this.#closed += 1;
    } else if (event.event === 'counters') this.#totals = event;
  }

  /**
   * Resolves once `connections` mirrored connections have ended and none is open, or after
   * `limitMs` whatever is left.
   */
  async drained(connections: number, limitMs: number): Promise<void> {
    const deadline = Date.now() + limitMs;
    while ((this.#closed < connections || this.#open.size > 0) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** One line: what mirrord replayed into the local app, and what it lost on the way. */
  summary(): string {
    const t = this.#totals;
    if (!t) return 'mirrord replayed nothing: the session did not start';
    const lost = [
      t.bytesDropped && `${t.bytesDropped} bytes dropped`,
      t.segmentsDroppedKernel && `${t.segmentsDroppedKernel} segments the tap could not copy`,
      t.connectionsDroppedAgent && `${t.connectionsDroppedAgent} connections the agent dropped`,
    ].filter(Boolean);
    return (
      `mirrord replayed ${t.replayed} of the ${t.opened} connections it saw into the local app, ` +
      `${t.completed} of them complete (${t.bytesReplayed} bytes${lost.map((l) => `, ${l}`).join('')})`
    );
  }
}

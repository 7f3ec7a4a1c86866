/**
 * The byte accounting of a `mirror --json` session, checked from its events: every byte the tap
 * copied is replayed, dropped or skipped, per connection and in total (see the `counters` event
 * in src/features/mirror/cli.ts, `Counters` in src/protocol/messages.ts and `ReplayStats` in
 * src/session/replay.ts for what each count means). Run after every test that drives traffic
 * through a session.
 */
import type { MirrorEvent } from '../../src/features/mirror/cli.js';
import type { ReplayAccount, ReplayStats } from '../../src/session/replay.js';
import { until, type MirrorEventLine, type MirrorRun } from './mirror-cli.js';

/** The totals of a `counters` event. */
export type Totals = Extract<MirrorEvent, { event: 'counters' }>;
type Closed = Extract<MirrorEvent, { event: 'closed' }>;
type Skipped = Extract<MirrorEvent, { event: 'skipped' }>;

const countersOf = (events: MirrorEventLine[]): Totals[] =>
  events.filter((e) => e.event === 'counters') as unknown as Totals[];

/** Whether a counters event says nothing is on its way anywhere between the tap and the app. */
function atRest(c: Totals): boolean {
  return (
    c.connectionsOpen === 0 &&
    c.bytesInAgent === 0 &&
    c.bytesPending === 0 &&
    c.bytesMirrored === c.bytesReceived
  );
}

/**
 * Waits until the session reports nothing in flight (its agent sends counters every second):
 * every mirrored connection closed, every copied byte past the agent, every sent byte received
 * and settled. Call it before stopping a session whose totals are then checked with
 * `expectAccounted(…, { atRest: true })`.
 */
export async function untilAtRest(run: MirrorRun, ms = 60_000): Promise<void> {
  await until(
    () => {
      const last = countersOf(run.events()).at(-1);
      return last !== undefined && atRest(last);
    },
    `the session to have nothing in flight (last counters: ${JSON.stringify(countersOf(run.events()).at(-1))})`,
    ms,
  );
}

/**
 * Asserts the accounting of a finished session (its events up to the final counters):
 * - every counters event: the agent's bytes add up (`bytesCopied` = mirrored + ignored + dropped
 *   in the agent + still in the agent) and so do the replay's (`bytesReceived` = replayed +
 *   dropped + skipped + pending);
 * - every connection: one final `closed` (replayed) or `skipped` event, whose bytes add up
 *   (`bytesMirrored` = replayed + dropped), with nothing dropped when it ended as its client
 *   ended it (`fin`, `rst`);
 * - in total: the connections' counts sum to the session's, nothing is pending at the end;
 * - with `atRest` (the session was stopped with nothing in flight, see untilAtRest): every byte
 *   the tap copied is accounted for, `bytesCopied` = replayed + dropped (locally and in the
 *   agent) + skipped (connections not replayed, and copied bytes that are no stream data).
 * Returns the final totals, for further checks.
 */
export function expectAccounted(events: MirrorEventLine[], options: { atRest: boolean }): Totals {
  const counters = countersOf(events);
  expect(counters.length).toBeGreaterThan(0);
  for (const c of counters) {
    expect({
      agent: c.bytesMirrored + c.bytesIgnored + c.bytesDroppedAgent + c.bytesInAgent,
      replay: c.bytesReplayed + c.bytesDropped + c.bytesSkipped + c.bytesPending,
    }).toEqual({ agent: c.bytesCopied, replay: c.bytesReceived });
    for (const [name, value] of Object.entries(c)) {
      if (typeof value === 'number') expect({ [name]: value >= 0 }).toEqual({ [name]: true });
    }
  }
  const final = counters.at(-1) as Totals;
  expect(events.at(-1)?.event).toBe('counters');

  const opened = events.filter((e) => e.event === 'opened').map((e) => e.id as number);
  const closed = events.filter((e) => e.event === 'closed') as unknown as Closed[];
  const skipped = events.filter((e) => e.event === 'skipped') as unknown as Skipped[];
  // Exactly one final count per connection, replayed or skipped.
  expect(closed.map((e) => e.id).sort()).toEqual([...opened].sort());
  expect(new Set(skipped.map((e) => e.id)).size).toBe(skipped.length);
  const wrong = closed.filter(
    (e) =>
      e.bytesMirrored !== e.bytesReplayed + e.bytesDropped ||
      e.bytesReplayed < 0 ||
      e.bytesDropped < 0 ||
      ((e.reason === 'fin' || e.reason === 'rst') && e.bytesDropped !== 0),
  );
  expect(wrong).toEqual([]);

  const sum = <T>(list: T[], count: (item: T) => number): number =>
    list.reduce((n, item) => n + count(item), 0);
  expect({
    // A skipped connection's mirrored bytes are all skipped.
    bytesReceived: sum(closed, (e) => e.bytesMirrored) + sum(skipped, (e) => e.bytesSkipped),
    bytesReplayed: sum(closed, (e) => e.bytesReplayed),
    bytesDropped: sum(closed, (e) => e.bytesDropped),
    bytesSkipped: sum(skipped, (e) => e.bytesSkipped),
    bytesPending: 0,
  }).toEqual({
    bytesReceived: final.bytesReceived,
    bytesReplayed: final.bytesReplayed,
    bytesDropped: final.bytesDropped,
    bytesSkipped: final.bytesSkipped,
    bytesPending: final.bytesPending,
  });

  if (options.atRest) {
    expect({ atRest: atRest(final), final }).toMatchObject({ atRest: true });
    expect(
      final.bytesReplayed +
        final.bytesDropped +
        final.bytesDroppedAgent +
        final.bytesSkipped +
        final.bytesIgnored,
    ).toBe(final.bytesCopied);
  }
  return final;
}

/**
 * The same for a Replay used directly, once closed: its totals add up with nothing pending, and
 * its `accounted` events, one per mirrored connection it saw, add up to them.
 */
export function expectReplayAccounted(stats: ReplayStats, accounts: ReplayAccount[]): void {
  expect(stats.bytesPending).toBe(0);
  expect(stats.bytesReplayed + stats.bytesDropped + stats.bytesSkipped).toBe(stats.bytesReceived);
  expect(new Set(accounts.map((a) => a.id)).size).toBe(accounts.length);
  expect(accounts).toHaveLength(stats.opened);
  const wrong = accounts.filter(
    (a) =>
      a.bytesMirrored !== a.bytesReplayed + a.bytesDropped + a.bytesSkipped ||
      (a.replayed ? a.bytesSkipped !== 0 : a.bytesSkipped !== a.bytesMirrored) ||
      ((a.reason === 'fin' || a.reason === 'rst') && a.bytesDropped !== 0),
  );
  expect(wrong).toEqual([]);
  const sum = (count: (a: ReplayAccount) => number): number =>
    accounts.reduce((n, a) => n + count(a), 0);
  expect({
    bytesReceived: sum((a) => a.bytesMirrored),
    bytesReplayed: sum((a) => a.bytesReplayed),
    bytesDropped: sum((a) => a.bytesDropped),
    bytesSkipped: sum((a) => a.bytesSkipped),
  }).toEqual({
    bytesReceived: stats.bytesReceived,
    bytesReplayed: stats.bytesReplayed,
    bytesDropped: stats.bytesDropped,
    bytesSkipped: stats.bytesSkipped,
  });
}

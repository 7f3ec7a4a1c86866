/**
 * The status line's words and numbers: units that fit the amount, plurals, a live line that
 * fits the terminal, a last line that tells what the session did over its whole life, and the
 * notice about connections skipped because they began before mirroring.
 */
import {
  MidStreamNotices,
  StatusLine,
  fitFields,
  formatBytes,
  formatMilliseconds,
  formatStatus,
  formatSummary,
  midStreamNotice,
  plural,
} from '../src/cli/status-line.js';
import { NO_COUNTERS, type MirrorEvent } from '../src/features/mirror/cli.js';

type CountersEvent = Extract<MirrorEvent, { event: 'counters' }>;

/** A counters event of a session that mirrored nothing yet; `changes` on top. */
function counters(changes: Partial<CountersEvent> = {}): CountersEvent {
  return {
    event: 'counters',
    target: 'netns staging',
    ports: [],
    recentLagP50Ms: null,
    recentLagP99Ms: null,
    ...NO_COUNTERS,
    opened: 0,
    replayed: 0,
    skippedMidStream: 0,
    skippedUnrouted: 0,
    completed: 0,
    endedByAgent: 0,
    failedToConnect: 0,
    droppedSlow: 0,
    droppedAppGone: 0,
    droppedSessionEnded: 0,
    bytesReceived: 0,
    bytesReplayed: 0,
    bytesDropped: 0,
    bytesSkipped: 0,
    bytesPending: 0,
    lagP50Ms: null,
    lagP99Ms: null,
    ...changes,
  };
}

/** A busy session: every field of the live status has something to say. */
const busy = counters({
  target: 'pod staging/api-7f9c8d6b5-x2x4q container api',
  ports: [8080, 9090],
  recentLagP50Ms: 1.23,
  recentLagP99Ms: 48.7,
  opened: 1302,
  replayed: 1290,
  completed: 1287,
  skippedMidStream: 12,
  bytesReplayed: 48_213_900,
  bytesDroppedKernel: 1_500,
  segmentsDroppedKernel: 2,
  bytesDropped: 20_480,
  lagP50Ms: 2.5,
  lagP99Ms: 1_840,
});

describe('units', () => {
  test.each([
    [0, '0 B'],
    [1, '1 B'],
    [999, '999 B'],
    [1_000, '1.0 kB'],
    [1_549, '1.5 kB'],
    [9_949, '9.9 kB'],
    [9_951, '10 kB'],
    [999_499, '999 kB'],
    [999_500, '1.0 MB'],
    [48_213_900, '48 MB'],
    [5_300_000_000, '5.3 GB'],
    [7e15, '7000 TB'],
  ])('%d bytes are %s', (bytes, text) => {
    expect(formatBytes(bytes)).toBe(text);
  });

  test.each([
    [0.04, '0.0 ms'],
    [1.26, '1.3 ms'],
    [9.96, '10 ms'],
    [48.7, '49 ms'],
    [999.4, '999 ms'],
    [999.6, '1.0 s'],
    [12_345, '12.3 s'],
  ])('%d ms is %s', (ms, text) => {
    expect(formatMilliseconds(ms)).toBe(text);
  });

  test('plurals, and counts with thousands separated', () => {
    expect(plural(0, 'connection')).toBe('0 connections');
    expect(plural(1, 'connection')).toBe('1 connection');
    expect(plural(2, 'connection')).toBe('2 connections');
    expect(plural(12_345, 'segment')).toBe('12,345 segments');
  });
});

describe('the live status', () => {
  test('with room, it says everything', () => {
    expect(formatStatus(busy, 250)).toBe(
      'mirrord: pod staging/api-7f9c8d6b5-x2x4q container api · ports 8080, 9090 · ' +
        '1,290 connections (3 open) · 48 MB replayed · lag p50 1.2 ms, p99 49 ms · ' +
        'dropped 22 kB · 12 skipped',
    );
  });

  test.each([10, 20, 40, 60, 80, 100, 120, 160, 200])(
    'at %d columns it stays shorter than the terminal is wide, the important parts kept',
    (columns) => {
      const line = formatStatus(busy, columns);
      expect(line.length).toBeLessThanOrEqual(columns - 1);
      if (columns >= 80) {
        // The counts and the loss stay; the target is cut rather than lose them.
        expect(line).toMatch(/^mirrord: pod staging\/api/);
        expect(line).toContain(' · 1,290 connections (3 open) · ');
        expect(line).toContain(' · dropped 22 kB');
      }
    },
  );

  test('fields go least important first; a cuttable one is cut instead, then the line', () => {
    const fields = [
      { text: 'mirrord: a long target name', rank: 2, keepChars: 12 },
      { text: 'count', rank: 1 },
      { text: 'extra', rank: 4 },
      { text: 'detail', rank: 3 },
    ];
    expect(fitFields(fields, 100)).toBe('mirrord: a long target name · count · extra · detail');
    expect(fitFields(fields, 44)).toBe('mirrord: a long target name · count · detail');
    expect(fitFields(fields, 35)).toBe('mirrord: a long target name · count');
    expect(fitFields(fields, 30)).toBe('mirrord: a long targe… · count');
    // The cut field as short as it gets: the next goes, then the line is cut.
    expect(fitFields(fields, 16)).toBe('mirrord: a…');
    expect(fitFields(fields, 8)).toBe('mirrord…');
  });

  test('nothing dropped, a single connection, no port yet', () => {
    const line = formatStatus(
      counters({
        replayed: 1,
        completed: 1,
        bytesReplayed: 420,
        recentLagP50Ms: 0.5,
        recentLagP99Ms: 0.9,
      }),
      200,
    );
    expect(line).toBe(
      'mirrord: netns staging · no port mirrored · 1 connection (0 open) · 420 B replayed · ' +
        'lag p50 0.5 ms, p99 0.9 ms · nothing dropped',
    );
  });
});

describe('the last line', () => {
  test('what the session mirrored over its life, in units that fit, with plurals', () => {
    expect(
      formatSummary({
        counters: counters({
          replayed: 1,
          completed: 1,
          bytesReplayed: 137,
          lagP50Ms: 3.2,
          lagP99Ms: 3.2,
        }),
        // The app closed its listener before the end: the port was mirrored all the same.
        portsMirrored: [8080],
        portsIgnored: [],
      }),
    ).toBe(
      'mirrord: netns staging · port 8080 mirrored · 1 connection · 137 B replayed · ' +
        'lag p50 3.2 ms, p99 3.2 ms · nothing dropped',
    );
  });

  test('ignored ports, skipped connections and every loss are told', () => {
    expect(
      formatSummary({
        counters: busy,
        portsMirrored: [9090, 8080, 8080],
        portsIgnored: [9100, 7000],
      }),
    ).toBe(
      'mirrord: pod staging/api-7f9c8d6b5-x2x4q container api · ports 8080, 9090 mirrored, ' +
        'ports 7000, 9100 ignored · 1,290 connections, skipped 12 open before mirroring ' +
        '(--mid-stream replays them) · 48 MB replayed · lag p50 2.5 ms, p99 1.8 s · ' +
        'dropped 1.5 kB in the kernel, 20 kB locally',
    );
  });

  test('a session that mirrored nothing says so', () => {
    expect(formatSummary({ counters: counters(), portsMirrored: [], portsIgnored: [9090] })).toBe(
      'mirrord: netns staging · no port mirrored, port 9090 ignored · 0 connections · ' +
        '0 B replayed · nothing dropped',
    );
  });

  test('losses without bytes are counted in what was lost', () => {
    const line = formatSummary({
      counters: counters({ segmentsDroppedKernel: 3, connectionsDroppedAgent: 1 }),
      portsMirrored: [80],
      portsIgnored: [],
    });
    expect(line).toContain('dropped 3 segments in the kernel, 1 connection in the agent');
    expect(line).not.toContain('nothing dropped');
  });

  test("StatusLine remembers every port mirrored, also one the app closed, and --port's", () => {
    const logged: string[] = [];
    const status = new StatusLine({ log: (line) => logged.push(line), portsIgnored: [9090] });
    expect(status.summary()).toBeUndefined();
    status.record({ event: 'listen', port: 8080, localPort: 8080 });
    status.record(counters({ ports: [8080, 7000] }));
    // The app closed 8080; only --port 7000 is routed now.
    status.record(counters({ ports: [7000], replayed: 2, completed: 2, bytesReplayed: 2_400 }));
    expect(status.summary()).toBe(
      'mirrord: netns staging · ports 7000, 8080 mirrored, port 9090 ignored · 2 connections · ' +
        '2.4 kB replayed · nothing dropped',
    );
    expect(logged).toEqual([]);
  });
});

describe('connections skipped because they began before mirroring', () => {
  test('the notice, singular and plural', () => {
    expect(midStreamNotice(1)).toBe(
      'mirrord: 1 open connection skipped: it began before mirroring; --mid-stream replays it',
    );
    expect(midStreamNotice(2)).toBe(
      'mirrord: 2 open connections skipped: they began before mirroring; --mid-stream replays them',
    );
  });

  test('told once the count settles, again only when it grew and 30 s passed', () => {
    const notices = new MidStreamNotices();
    const seconds = (s: number): number => s * 1000;
    expect(notices.observe(0, seconds(0))).toBeUndefined();
    // A keep-alive pool shows up over a couple of counters events.
    expect(notices.observe(1, seconds(1))).toBeUndefined();
    expect(notices.observe(257, seconds(2))).toBeUndefined();
    expect(notices.observe(257, seconds(3))).toBe(midStreamNotice(257));
    // Not on every event, even when it grows: at most every 30 s.
    expect(notices.observe(257, seconds(4))).toBeUndefined();
    expect(notices.observe(260, seconds(10))).toBeUndefined();
    expect(notices.observe(260, seconds(32))).toBeUndefined();
    expect(notices.observe(261, seconds(33))).toBe(midStreamNotice(261));
    // No growth: nothing to tell, however long it has been.
    expect(notices.observe(261, seconds(100))).toBeUndefined();
  });

  test('a count that keeps growing is told after 5 s anyway', () => {
    const notices = new MidStreamNotices();
    for (let s = 1; s < 5; s++) expect(notices.observe(s * 10, s * 1000)).toBeUndefined();
    expect(notices.observe(50, 5000)).toBeUndefined();
    expect(notices.observe(60, 6000)).toBe(midStreamNotice(60));
  });

  test('StatusLine logs it once, not with every status', () => {
    const logged: string[] = [];
    const drawn: string[] = [];
    const status = new StatusLine({
      log: (line) => logged.push(line),
      draw: (render) => drawn.push(render(200)),
      portsIgnored: [],
    });
    for (let i = 0; i < 5; i++) status.record(counters({ skippedMidStream: 2 }));
    expect(logged).toEqual([midStreamNotice(2)]);
    expect(drawn).toHaveLength(5);
    expect(drawn.at(-1)).toContain('2 skipped');
  });
});

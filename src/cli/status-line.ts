import type { MirrorEvent } from '../features/mirror/cli.js';

type CountersEvent = Extract<MirrorEvent, { event: 'counters' }>;

/** "1 connection", "2 connections", "12,345 connections". */
export function plural(count: number, one: string, many = `${one}s`): string {
  return `${count.toLocaleString('en-US')} ${count === 1 ? one : many}`;
}

const BYTE_UNITS = ['kB', 'MB', 'GB', 'TB'];

/** Bytes in the unit that fits (decimal, as network traffic is counted): 512 B, 1.5 kB, 42 MB. */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  let value = bytes;
  let unit = -1;
  let text: string;
  // Two or three significant digits; 999.7 kB rounds to 1000, which is 1.0 MB.
  do {
    value /= 1000;
    unit++;
    text = value < 9.95 ? value.toFixed(1) : value.toFixed(0);
  } while (Number(text) >= 1000 && unit < BYTE_UNITS.length - 1);
  return `${text} ${BYTE_UNITS[unit]}`;
}

/** A duration in ms, in the unit that fits: 0.4 ms, 12 ms, 1.3 s. */
export function formatMilliseconds(ms: number): string {
  if (ms < 9.95) return `${ms.toFixed(1)} ms`;
  if (ms < 999.5) return `${ms.toFixed(0)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

function formatLag(p50: number | null, p99: number | null): string | undefined {
  if (p50 === null || p99 === null) return undefined;
  return `lag p50 ${formatMilliseconds(p50)}, p99 ${formatMilliseconds(p99)}`;
}

/** The ports, as a list: "port 80", "ports 80, 443". */
function formatPorts(ports: Iterable<number>): string | undefined {
  const sorted = [...new Set(ports)].sort((a, b) => a - b);
  if (sorted.length === 0) return undefined;
  return `${sorted.length === 1 ? 'port' : 'ports'} ${sorted.join(', ')}`;
}

/** What was lost and where, or undefined when nothing was. */
function formatDrops(c: CountersEvent): string | undefined {
  const where: string[] = [];
  // Bytes where there were any; a count of segments or connections when only those were lost
  // (a dropped SYN or FIN carries no bytes, and still costs a connection).
  if (c.bytesDroppedKernel > 0) where.push(`${formatBytes(c.bytesDroppedKernel)} in the kernel`);
  else if (c.segmentsDroppedKernel > 0) {
    where.push(`${plural(c.segmentsDroppedKernel, 'segment')} in the kernel`);
  }
  if (c.bytesDroppedAgent > 0) where.push(`${formatBytes(c.bytesDroppedAgent)} in the agent`);
  else if (c.connectionsDroppedAgent > 0) {
    where.push(`${plural(c.connectionsDroppedAgent, 'connection')} in the agent`);
  }
  if (c.bytesDropped > 0) where.push(`${formatBytes(c.bytesDropped)} locally`);
  return where.length ? `dropped ${where.join(', ')}` : undefined;
}

/** Replayed connections still open. */
function openConnections(c: CountersEvent): number {
  return (
    c.replayed -
    c.completed -
    c.endedByAgent -
    c.failedToConnect -
    c.droppedSlow -
    c.droppedAppGone -
    c.droppedSessionEnded
  );
}

/**
 * A part of the live status. When the status is too wide, the field with the highest `rank`
 * goes first; one with `keepChars` is cut (with "…") to no fewer than that many characters
 * instead, and stays.
 */
interface Field {
  text: string;
  rank: number;
  keepChars?: number;
}

const SEPARATOR = ' · ';

/**
 * Joins the fields in order, leaving out or cutting the least important until the line is at
 * most `width` characters; if the fields that stay are still too long, the line is cut with
 * "…". Every character of a status is one column wide (ASCII, "·", "…"), so a length is a
 * width.
 */
export function fitFields(fields: Field[], width: number): string {
  const kept = fields.map((field) => ({ ...field }));
  const join = (): string => kept.map((f) => f.text).join(SEPARATOR);
  let line = join();
  for (;;) {
    if (line.length <= width) return line;
    // The last of the highest rank: the fields are listed from the most to the least useful.
    let choice: number | undefined;
    for (const [i, field] of kept.entries()) {
      if (field.rank >= 0 && (choice === undefined || field.rank >= kept[choice]!.rank)) {
        choice = i;
      }
    }
    if (choice === undefined) break;
    const field = kept[choice]!;
    if (field.keepChars === undefined) {
      kept.splice(choice, 1);
    } else {
      const length = Math.max(field.keepChars, field.text.length - (line.length - width));
      if (length < field.text.length) field.text = `${field.text.slice(0, length - 1).trimEnd()}…`;
      field.rank = -1; // as short as it gets
    }
    line = join();
  }
  return `${line.slice(0, Math.max(0, width - 1))}…`;
}

/** The live status's word on losses: their total (the last line tells where). */
function formatDropTotal(c: CountersEvent): string | undefined {
  const bytes = c.bytesDroppedKernel + c.bytesDroppedAgent + c.bytesDropped;
  if (bytes > 0) return `dropped ${formatBytes(bytes)}`;
  const lost = [
    c.segmentsDroppedKernel > 0 ? plural(c.segmentsDroppedKernel, 'segment') : '',
    c.connectionsDroppedAgent > 0 ? plural(c.connectionsDroppedAgent, 'connection') : '',
  ].filter(Boolean);
  return lost.length ? `dropped ${lost.join(', ')}` : undefined;
}

/** A long target is cut to this, rather than leave out the counts. */
const TARGET_KEEP_CHARS = 30;

/**
 * The live status, at most `columns - 1` characters so that it never wraps (a terminal wraps,
 * or waits to, when the last column is written): target, ports, connections, bytes, lag (of
 * the last second) and losses, the least important left out first on a narrow terminal.
 */
export function formatStatus(c: CountersEvent, columns: number): string {
  const drops = formatDropTotal(c);
  const skipped = c.skippedMidStream + c.skippedUnrouted;
  const lag = formatLag(c.recentLagP50Ms, c.recentLagP99Ms);
  const fields: (Field | undefined)[] = [
    { text: `mirrord: ${c.target}`, rank: 2, keepChars: TARGET_KEEP_CHARS },
    { text: formatPorts(c.ports) ?? 'no port mirrored', rank: 5 },
    { text: `${plural(c.replayed, 'connection')} (${openConnections(c)} open)`, rank: 1 },
    { text: `${formatBytes(c.bytesReplayed)} replayed`, rank: 3 },
    lag === undefined ? undefined : { text: lag, rank: 4 },
    // A loss matters as much as the count it is a loss of; none is the least news.
    { text: drops ?? 'nothing dropped', rank: drops ? 1 : 7 },
    skipped ? { text: `${skipped} skipped`, rank: 6 } : undefined,
  ];
  return fitFields(
    fields.filter((f) => f !== undefined),
    columns - 1,
  );
}

/** What a session did over its whole life, for its last line. */
export interface SessionSummary {
  /** The last counters: totals since the start (the lag too). */
  counters: CountersEvent;
  /** Every remote port mirrored at some time, also those the app closed since. */
  portsMirrored: Iterable<number>;
  /** Ports the user left out (--ignore-port). */
  portsIgnored: Iterable<number>;
}

/** The session's last line: what it mirrored over its life, and what it lost. */
export function formatSummary({
  counters: c,
  portsMirrored,
  portsIgnored,
}: SessionSummary): string {
  const ignored = formatPorts(portsIgnored);
  const ports = `${formatPorts(portsMirrored) ?? 'no port'} mirrored${ignored ? `, ${ignored} ignored` : ''}`;
  const skips = [
    c.skippedMidStream && `${c.skippedMidStream} open before mirroring (--mid-stream replays them)`,
    c.skippedUnrouted && `${c.skippedUnrouted} to a port no longer mirrored`,
  ].filter(Boolean);
  const connections =
    plural(c.replayed, 'connection') + (skips.length ? `, skipped ${skips.join(' and ')}` : '');
  const lag = formatLag(c.lagP50Ms, c.lagP99Ms);
  return [
    `mirrord: ${c.target}`,
    ports,
    connections,
    `${formatBytes(c.bytesReplayed)} replayed`,
    ...(lag ? [lag] : []),
    formatDrops(c) ?? 'nothing dropped',
  ].join(SEPARATOR);
}

/** The note that connections were skipped because they began before mirroring. */
export function midStreamNotice(count: number): string {
  return count === 1
    ? 'mirrord: 1 open connection skipped: it began before mirroring; --mid-stream replays it'
    : `mirrord: ${plural(count, 'open connection')} skipped: they began before mirroring; --mid-stream replays them`;
}

/** After a notice, a larger count is told again this long after it at the soonest. */
const NOTICE_REPEAT_MS = 30_000;
/** The first notice waits for the count to settle, but no longer than this. */
const NOTICE_SETTLE_LIMIT_MS = 5_000;

/**
 * When to tell that connections open before mirroring were skipped (counters.skippedMidStream).
 * A keep-alive pool shows up over the first second or so, as each connection next sends, and a
 * busy target has hundreds: the first notice waits until the count held still for one counters
 * event (about a second), so that it gives the pool's size rather than its first connection;
 * later growth (new pools, clients reconnecting) is told with the new total, at most every
 * 30 s, so that a busy session is not a stream of notices. The final line has the last count.
 */
export class MidStreamNotices {
  #told = 0;
  #toldAt: number | undefined;
  #previous = 0;
  #firstSeenAt: number | undefined;

  /** The notice to print now, if any, given the latest count. */
  observe(count: number, now: number): string | undefined {
    const growing = count > this.#previous;
    this.#previous = count;
    if (count <= this.#told) return undefined;
    this.#firstSeenAt ??= now;
    const due =
      this.#toldAt === undefined
        ? !growing || now - this.#firstSeenAt >= NOTICE_SETTLE_LIMIT_MS
        : now - this.#toldAt >= NOTICE_REPEAT_MS;
    if (!due) return undefined;
    this.#told = count;
    this.#toldAt = now;
    return midStreamNotice(count);
  }
}

export interface StatusLineOptions {
  /** Draws the live status (see SessionTerminal.setStatus); without it, none is shown. */
  draw?(render: (columns: number) => string): void;
  /** Prints a note for good (the mid-stream notice). */
  log(line: string): void;
  portsIgnored: Iterable<number>;
}

/**
 * Follows a session's events: the live status and the mid-stream notices as they come, and what
 * the session mirrored over its life for its last line.
 */
export class StatusLine {
  #last: CountersEvent | undefined;
  readonly #portsMirrored = new Set<number>();
  readonly #notices = new MidStreamNotices();

  constructor(private readonly options: StatusLineOptions) {}

  record(event: MirrorEvent): void {
    // The app's ports are announced by `listen`; ports given with --port only in the counters.
    if (event.event === 'listen') this.#portsMirrored.add(event.port);
    if (event.event !== 'counters') return;
    this.#last = event;
    for (const port of event.ports) this.#portsMirrored.add(port);
    const notice = this.#notices.observe(event.skippedMidStream, Date.now());
    if (notice) this.options.log(notice);
    this.options.draw?.((columns) => formatStatus(event, columns));
  }

  /** The session's last line, once it had counters. */
  summary(): string | undefined {
    if (!this.#last) return undefined;
    return formatSummary({
      counters: this.#last,
      portsMirrored: this.#portsMirrored,
      portsIgnored: this.options.portsIgnored,
    });
  }
}

import type { MirrorEvent } from '../session/mirror.js';

type CountersEvent = Extract<MirrorEvent, { event: 'counters' }>;

function megabytes(bytes: number): string {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

function milliseconds(ms: number | null): string {
  if (ms === null) return '–';
  return ms < 10 ? ms.toFixed(1) : ms.toFixed(0);
}

/**
 * One line: target, ports, connections, bytes, what was dropped where, and the mirror lag
 * (p50/p99: of the last second while running, of the whole session at the end).
 */
export function formatStatus(c: CountersEvent, final = false): string {
  const ports = c.ports.length ? c.ports.join(',') : 'none yet';
  const open =
    c.replayed -
    c.completed -
    c.endedByAgent -
    c.failedToConnect -
    c.droppedSlow -
    c.droppedAppGone -
    c.droppedSessionEnded;
  const [p50, p99] = final ? [c.lagP50Ms, c.lagP99Ms] : [c.recentLagP50Ms, c.recentLagP99Ms];
  return (
    `mirrord: ${c.target} · ports ${ports} · ${c.replayed} connections (${open} open) · ` +
    `${megabytes(c.bytesReplayed)} replayed · lag p50/p99 ${milliseconds(p50)}/${milliseconds(p99)} ms · ` +
    `dropped: ${megabytes(c.bytesDroppedKernel)} in the kernel, ` +
    `${megabytes(c.bytesDroppedAgent)} in the agent, ${megabytes(c.bytesDropped)} locally`
  );
}

/**
 * The status line on stderr: rewritten in place on a terminal, and printed once at the end
 * either way, so a log keeps the totals without a line a second.
 */
export class StatusLine {
  #last: CountersEvent | undefined;

  constructor(private readonly stream: NodeJS.WriteStream = process.stderr) {}

  update(event: CountersEvent): void {
    this.#last = event;
    if (this.stream.isTTY) this.stream.write(`\r\x1b[2K${formatStatus(event)}`);
  }

  /** Makes room for another line on a terminal; the status comes back with the next update. */
  clear(): void {
    if (this.stream.isTTY && this.#last) this.stream.write('\r\x1b[2K');
  }

  /** At the end: the last status, for good. */
  finish(): void {
    if (!this.#last) return;
    this.stream.write(`${this.stream.isTTY ? '\r\x1b[2K' : ''}${formatStatus(this.#last, true)}\n`);
    this.#last = undefined;
  }
}

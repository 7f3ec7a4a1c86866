import type { MirrorEvent } from '../session/mirror.js';

type CountersEvent = Extract<MirrorEvent, { event: 'counters' }>;

function megabytes(bytes: number): string {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

/** One line: ports, connections, bytes and what was dropped where. */
export function formatStatus(c: CountersEvent): string {
  const ports = c.ports.length ? c.ports.join(',') : 'none yet';
  const open =
    c.replayed -
    c.completed -
    c.endedByAgent -
    c.failedToConnect -
    c.droppedSlow -
    c.droppedAppGone -
    c.droppedSessionEnded;
  return (
    `mirrord: ports ${ports} · ${c.replayed} connections (${open} open) · ` +
    `${megabytes(c.bytesReplayed)} replayed · dropped: ${megabytes(c.bytesDroppedKernel)} in the kernel, ` +
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
    this.stream.write(`${this.stream.isTTY ? '\r\x1b[2K' : ''}${formatStatus(this.#last)}\n`);
    this.#last = undefined;
  }
}

import { EventEmitter } from 'node:events';
import type { Readable } from 'node:stream';

/**
 * What one container instance printed, kept as the CRI keeps it: stdout and stderr interleaved
 * line by line, each line stamped with the time it arrived. A line longer than 16 KiB is split,
 * as containerd splits it; the oldest lines go once 8 MiB are kept (kubelet rotates too).
 */

export interface LogLine {
  time: Date;
  bytes: Buffer;
}

const MAX_LINE = 16 * 1024;
const MAX_KEPT = 8 * 1024 * 1024;

export class ContainerLog extends EventEmitter<{ line: [LogLine]; end: [] }> {
  readonly lines: LogLine[] = [];
  #kept = 0;
  #open = 0;
  #ended = false;

  get ended(): boolean {
    return this.#ended;
  }

  /** Takes a stream of the container's output; the log ends once every stream ended. */
  attach(stream: Readable): void {
    this.#open += 1;
    let partial: Buffer = Buffer.alloc(0);
    stream.on('data', (chunk: Buffer) => {
      partial = partial.length ? Buffer.concat([partial, chunk]) : chunk;
      for (;;) {
        const newline = partial.indexOf(0x0a);
        const end = newline === -1 ? (partial.length >= MAX_LINE ? MAX_LINE : -1) : newline + 1;
        if (end === -1) break;
        this.#append(partial.subarray(0, Math.min(end, MAX_LINE)));
        partial = partial.subarray(Math.min(end, MAX_LINE));
      }
    });
    stream.once('close', () => {
      if (partial.length) this.#append(partial);
      this.#open -= 1;
      if (this.#open === 0) {
        this.#ended = true;
        this.emit('end');
      }
    });
  }

  /** A line from the runtime itself, e.g. why the process could not be started. */
  note(text: string): void {
    this.#append(Buffer.from(`${text}\n`));
  }

  #append(bytes: Buffer): void {
    const line = { time: new Date(), bytes: Buffer.from(bytes) };
    this.lines.push(line);
    this.#kept += bytes.length;
    while (this.#kept > MAX_KEPT && this.lines.length > 1) {
      this.#kept -= this.lines.shift()?.bytes.length ?? 0;
    }
    this.emit('line', line);
  }

  text(): string {
    return Buffer.concat(this.lines.map((l) => l.bytes)).toString('utf8');
  }
}

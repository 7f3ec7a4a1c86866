/** The CLI's side of the `files` feature: the target's files, through the agent. */
import type { AgentClient } from '../../protocol/client.js';
import {
  FILES_FEATURE,
  MAX_READ_BYTES,
  fileRequestBody,
  parseFileReply,
  type FileReply,
  type FileRequest,
  type FileStat,
} from './messages.js';

/** Reads of one file in flight at once: enough to hide a port-forward's round trip. */
const READS_IN_FLIGHT = 8;

/**
 * Where streamFile hands a file: its size to expect with its first bytes (a small file's all,
 * in one go), then the other pieces in order.
 */
export interface FileSink {
  opened(stat: FileStat, size: number, head: Buffer): Promise<void>;
  piece(bytes: Buffer, offset: number): Promise<void>;
}

export class RemoteFiles {
  readonly #client: AgentClient;

  constructor(client: AgentClient) {
    this.#client = client;
  }

  async ask<Op extends FileRequest['op']>(
    request: FileRequest & { op: Op },
  ): Promise<FileReply<Op>> {
    const body = await this.#client.request(FILES_FEATURE, fileRequestBody(request));
    return parseFileReply(request.op, body);
  }

  /**
   * A whole file, handed to `sink` piece by piece as it comes: its first bytes with the open,
   * the rest `MAX_READ_BYTES` at a time with a few reads in flight, each piece awaited (the
   * sink's backpressure). `opened` gets the size to expect (stat's: a file that grows meanwhile
   * is read as far as it was); the result is the bytes handed over (fewer when it shrank), or
   * the errno. A file larger than `maxBytes` is EFBIG.
   */
  async streamFile(
    path: string,
    maxBytes: number,
    sink: FileSink,
  ): Promise<{ errno: string } | { errno: null; bytes: number }> {
    const opened = await this.ask({ op: 'open', path });
    if (opened.errno !== null) return { errno: opened.errno };
    const { handle, stat, head } = opened.result;
    try {
      const size = handle === 0 ? head.length : Math.max(stat.size, head.length);
      if (size > maxBytes) return { errno: 'EFBIG' };
      await sink.opened(stat, size, head);
      let done = head.length;
      let next = head.length;
      const reads: Promise<FileReply<'read'>>[] = [];
      const issue = (): void => {
        while (handle !== 0 && reads.length < READS_IN_FLIGHT && next < size) {
          reads.push(
            this.ask({
              op: 'read',
              handle,
              offset: next,
              length: Math.min(MAX_READ_BYTES, size - next),
            }),
          );
          next += MAX_READ_BYTES;
        }
      };
      issue();
      while (reads.length > 0) {
        const reply = await reads.shift()!;
        if (reply.errno !== null) return { errno: reply.errno };
        const wanted = Math.min(MAX_READ_BYTES, size - done);
        await sink.piece(reply.result, done);
        done += reply.result.length;
        // A short read is the end: the file shrank; the reads after it find nothing.
        if (reply.result.length < wanted) break;
        issue();
      }
      return { errno: null, bytes: done };
    } finally {
      if (handle !== 0) await this.ask({ op: 'close', handle }).catch(() => undefined);
    }
  }

  /** A whole file in memory (see streamFile). */
  async readFile(
    path: string,
    maxBytes = Number.MAX_SAFE_INTEGER,
  ): Promise<{ errno: null; bytes: Buffer; stat: FileStat } | { errno: string }> {
    let bytes = Buffer.alloc(0);
    let stat: FileStat | undefined;
    const read = await this.streamFile(path, maxBytes, {
      opened: async (opened, size, head) => {
        stat = opened;
        bytes = Buffer.allocUnsafe(size);
        head.copy(bytes);
      },
      piece: async (piece, offset) => void piece.copy(bytes, offset),
    });
    if (read.errno !== null) return read;
    return { errno: null, bytes: bytes.subarray(0, read.bytes), stat: stat! };
  }
}

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
   * A whole file: its first bytes come with the open, the rest `MAX_READ_BYTES` at a time with a
   * few reads in flight, each copied once into its place; the errno when it cannot be opened
   * or read.
   */
  async readFile(
    path: string,
    maxBytes = Number.MAX_SAFE_INTEGER,
  ): Promise<{ errno: null; bytes: Buffer; stat: FileStat } | { errno: string }> {
    const opened = await this.ask({ op: 'open', path });
    if (opened.errno !== null) return { errno: opened.errno };
    const { handle, stat, head } = opened.result;
    if (handle === 0) return { errno: null, bytes: head, stat };
    try {
      if (stat.size > maxBytes) return { errno: 'EFBIG' };
      // The size stat gave; a file that grows meanwhile is read as far as it was.
      const bytes = Buffer.allocUnsafe(Math.max(stat.size, head.length));
      head.copy(bytes);
      let end = head.length;
      while (end < bytes.length) {
        const reads = [];
        for (
          let at = end;
          at < bytes.length && reads.length < READS_IN_FLIGHT;
          at += MAX_READ_BYTES
        ) {
          reads.push(
            this.ask({
              op: 'read',
              handle,
              offset: at,
              length: Math.min(MAX_READ_BYTES, bytes.length - at),
            }),
          );
        }
        for (const reply of await Promise.all(reads)) {
          if (reply.errno !== null) return { errno: reply.errno };
          reply.result.copy(bytes, end);
          end += reply.result.length;
          // A short read is the end: the file shrank.
          if (reply.result.length < MAX_READ_BYTES && end < bytes.length)
            return { errno: null, bytes: bytes.subarray(0, end), stat };
        }
      }
      return { errno: null, bytes, stat };
    } finally {
      await this.ask({ op: 'close', handle }).catch(() => undefined);
    }
  }
}

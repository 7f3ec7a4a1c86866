/** The CLI's side of the `files` feature: the target's files, through the agent. */
import type { AgentClient } from '../../protocol/client.js';
import {
  FILES_FEATURE,
  MAX_READ_BYTES,
  fileRequestBody,
  parseFileReply,
  type FileReply,
  type FileRequest,
} from './messages.js';

/** Reads of one file in flight at once: enough to hide a port-forward's round trip. */
const READS_IN_FLIGHT = 4;

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
   * A whole file, read `MAX_READ_BYTES` at a time with a few reads in flight; the errno when it
   * cannot be opened or read.
   */
  async readFile(path: string): Promise<{ errno: null; bytes: Buffer } | { errno: string }> {
    const opened = await this.ask({ op: 'open', path });
    if (opened.errno !== null) return { errno: opened.errno };
    const { handle } = opened.result;
    try {
      const parts: Buffer[] = [];
      let total = 0;
      for (let offset = 0; ; offset += READS_IN_FLIGHT * MAX_READ_BYTES) {
        const reads = Array.from({ length: READS_IN_FLIGHT }, (_, i) =>
          this.ask({
            op: 'read',
            handle,
            offset: offset + i * MAX_READ_BYTES,
            length: MAX_READ_BYTES,
          }),
        );
        let short = false;
        for (const reply of await Promise.all(reads)) {
          if (reply.errno !== null) return { errno: reply.errno };
          if (short) continue;
          parts.push(reply.result);
          total += reply.result.length;
          // A short read is the end (a file that grows meanwhile is read as far as it was).
          short = reply.result.length < MAX_READ_BYTES;
        }
        if (short) return { errno: null, bytes: Buffer.concat(parts, total) };
      }
    } finally {
      await this.ask({ op: 'close', handle }).catch(() => undefined);
    }
  }
}

/**
 * The files feature between the app's layer and the agent: answers each `file` call of a
 * process of the app (layer/files.c) from the target's file system through the agent.
 */
import { chmodSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { LayerChannel, LayerReply } from '../../session/layer-channel.js';
import type { LayerMessage, LayerStat, SessionMessage } from '../../session/layer-messages.js';
import type { RemoteFiles } from './cli.js';
import { MAX_READ_BYTES, type FileKind, type FileStat } from './messages.js';

/**
 * Largest file the app is given: it gets the whole of it at open, in memory (the layer's memfd);
 * a larger one fails as too big (EFBIG) with a line.
 */
export const MAX_APP_FILE_BYTES = 256 * 1024 * 1024;
/** The bytes of one `fileData` message of a listing: a file's pieces are the agent's reads. */
const DATA_BYTES = MAX_READ_BYTES;
/** How a listing names each entry's kind (layer/files.c reads them as d_type). */
const KIND_LETTERS: Record<FileKind, string> = { file: 'f', dir: 'd', symlink: 'l', other: 'o' };

function layerStat(stat: FileStat): LayerStat {
  const time = (ns: bigint): number[] => [Number(ns / 1_000_000_000n), Number(ns % 1_000_000_000n)];
  return [
    stat.mode,
    stat.size,
    stat.uid,
    stat.gid,
    stat.ino,
    stat.nlink,
    stat.dev,
    ...time(stat.atimeNs),
    ...time(stat.mtimeNs),
    ...time(stat.ctimeNs),
  ];
}

/**
 * Serves the app's file calls on the target's paths until the channel closes, each through
 * `files()`, the current session's. The layer makes its stand-ins of the target's directories
 * (layer/files.c) in `dirs` beside the channel's socket, which goes with it: open to every
 * user, sticky, as the app may drop privileges.
 */
export function serveAppFiles(
  channel: LayerChannel,
  files: () => RemoteFiles,
  log: (line: string) => void,
): void {
  const dirs = join(dirname(channel.path), 'dirs');
  mkdirSync(dirs);
  chmodSync(dirs, 0o1777);
  channel.on('file', (request, reply) => {
    answer(request, reply, files(), log).catch(async (error: Error) => {
      // The session is gone, or the agent failed the request: the app's call fails as an
      // I/O error, never hangs.
      log(`mirrord: ${request.op} ${request.path} for the app failed: ${error.message}`);
      await reply.send({
        type: 'fileReply',
        id: request.id,
        errno: 'EIO',
        stat: null,
        size: 0,
        text: null,
      });
    });
  });
}

async function answer(
  request: Extract<LayerMessage, { type: 'file' }>,
  reply: LayerReply,
  files: RemoteFiles,
  log: (line: string) => void,
): Promise<void> {
  const { id, op, path } = request;
  const fail = (errno: string) =>
    reply.send({ type: 'fileReply', id, errno, stat: null, size: 0, text: null });
  switch (op) {
    case 'stat':
    case 'lstat': {
      const got = await files.ask({ op: 'stat', path, follow: op === 'stat' });
      if (got.errno !== null) return fail(got.errno);
      return reply.send({
        type: 'fileReply',
        id,
        errno: null,
        stat: layerStat(got.result),
        size: 0,
        text: null,
      });
    }
    case 'readlink': {
      const got = await files.ask({ op: 'readlink', path });
      if (got.errno !== null) return fail(got.errno);
      return reply.send({
        type: 'fileReply',
        id,
        errno: null,
        stat: null,
        size: 0,
        text: got.result,
      });
    }
    case 'list': {
      const got = await files.ask({ op: 'list', path });
      if (got.errno !== null) return fail(got.errno);
      const entries = Buffer.from(
        got.result.map(([name, kind]) => `${KIND_LETTERS[kind]}${name}\0`).join(''),
      );
      return sendBytes(reply, id, null, entries);
    }
    case 'open': {
      // Streamed: each piece goes to the app as it comes from the agent.
      let announced = 0;
      const streamed = await files.streamFile(path, MAX_APP_FILE_BYTES, {
        // One frame with the first bytes: a small file reaches the layer in one read.
        opened: (stat, size, head) => {
          announced = size;
          const opened: SessionMessage = {
            type: 'fileReply',
            id,
            errno: null,
            stat: layerStat(stat),
            size,
            text: null,
          };
          return head.length > 0
            ? reply.send(opened, { type: 'fileData', id, offset: 0, bytes: head })
            : reply.send(opened);
        },
        // Nothing for an empty piece: the layer takes one as the end.
        piece: async (bytes, offset) => {
          if (bytes.length > 0) await reply.send({ type: 'fileData', id, offset, bytes });
        },
      });
      if (streamed.errno === 'EFBIG') {
        log(
          `mirrord: ${path} is larger than ${MAX_APP_FILE_BYTES / 1024 / 1024} MiB: the app's open fails (EFBIG)`,
        );
      }
      // After the reply went, a second reply with the errno fails the open all the same.
      if (streamed.errno !== null) return fail(streamed.errno);
      // The file shrank meanwhile: an empty piece tells the layer that this is all.
      if (streamed.bytes < announced) {
        await reply.send({ type: 'fileData', id, offset: streamed.bytes, bytes: Buffer.alloc(0) });
      }
      return;
    }
  }
}

/** A reply whose `size` bytes follow in `fileData` messages, each sent once the socket takes it. */
async function sendBytes(
  reply: LayerReply,
  id: number,
  stat: LayerStat | null,
  bytes: Buffer,
): Promise<void> {
  await reply.send({ type: 'fileReply', id, errno: null, stat, size: bytes.length, text: null });
  for (let offset = 0; offset < bytes.length; offset += DATA_BYTES) {
    await reply.send({
      type: 'fileData',
      id,
      offset,
      bytes: bytes.subarray(offset, offset + DATA_BYTES),
    });
  }
}

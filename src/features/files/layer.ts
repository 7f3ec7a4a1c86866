/**
 * The files feature between the app's layer and the agent: answers each `file` call of a
 * process of the app (layer/files.c) from the target's file system through the agent.
 */
import type { LayerChannel, LayerReply } from '../../session/layer-channel.js';
import type { LayerMessage, LayerStat } from '../../session/layer-messages.js';
import type { RemoteFiles } from './cli.js';
import type { FileKind, FileStat } from './messages.js';

/**
 * Largest file the app is given: it gets the whole of it at open (the layer's private copy),
 * and the CLI holds it while it goes; a larger one fails as too big (EFBIG) with a line.
 */
export const MAX_APP_FILE_BYTES = 256 * 1024 * 1024;
/** The bytes of one `fileData` message: well under the layer's frame limit. */
const DATA_BYTES = 60 * 1024;
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

/** Serves the app's file calls on the target's paths until the channel closes. */
export function serveAppFiles(
  channel: LayerChannel,
  files: RemoteFiles,
  log: (line: string) => void,
): void {
  channel.on('file', (request, reply) => {
    answer(request, reply, files, log).catch(async (error: Error) => {
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
      const got = await files.readFile(path, MAX_APP_FILE_BYTES);
      if (got.errno !== null) {
        if (got.errno === 'EFBIG') {
          log(
            `mirrord: ${path} is larger than ${MAX_APP_FILE_BYTES / 1024 / 1024} MiB: the app's open fails (EFBIG)`,
          );
        }
        return fail(got.errno);
      }
      return sendBytes(reply, id, layerStat(got.stat), got.bytes);
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

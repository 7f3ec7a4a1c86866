/**
 * The layer channel's messages, both directions: what a process of the local app tells the
 * session (layer/layer.c writes them with msgpack-c) and what the session answers. They travel
 * in the agent protocol's framing (a u32 length and a msgpack array of messages), each message
 * `[code, ...fields]`.
 */
import {
  ProtocolError,
  arity,
  messageCode,
  port,
  str,
  uint,
  type WireMessage,
} from '../protocol/messages.js';

/** Codes; layer/layer.c has the same (LAYER_* and SESSION_*). */
export const LayerCode = {
  hello: 0x01,
  listen: 0x02,
  close: 0x03,
  lookup: 0x04,
  file: 0x05,
  peer: 0x10,
  shared: 0x11,
  fileReply: 0x12,
  fileData: 0x13,
} as const;

/** What the layer asks of the target's files (src/features/files/layer.ts answers). */
export const LAYER_FILE_OPS = ['open', 'stat', 'lstat', 'readlink', 'list'] as const;
export type LayerFileOp = (typeof LAYER_FILE_OPS)[number];

/** From a process of the app. */
export type LayerMessage =
  /** The first message: the token from the app's environment proves it is the session's app. */
  | { type: 'hello'; pid: number; token: string }
  | {
      type: 'listen';
      pid: number;
      /** The port the app asked for. */
      port: number;
      /** The port it really listens on. */
      localPort: number;
      family: 4 | 6;
      address: string;
    }
  | { type: 'close'; pid: number; port: number }
  /** Who is the client of the app's `socket` (an inode), accepted from `sourcePort`? */
  | { type: 'lookup'; pid: number; sourcePort: number; localPort: number; socket: string }
  /** A call of the app on one of the target's paths; answered by `fileReply` with the same id. */
  | { type: 'file'; pid: number; id: number; op: LayerFileOp; path: string };

/**
 * A file's stat as the layer fills `struct stat`: mode, size, uid, gid, ino, nlink, dev, then
 * the seconds and nanoseconds of atime, mtime and ctime.
 */
export type LayerStat = readonly number[];

/** From the session. */
export type SessionMessage =
  /**
   * The original client of the replayed connection from `sourcePort` to the app's `localPort`;
   * `socket` is set when it answers a lookup.
   */
  | {
      type: 'peer';
      sourcePort: number;
      localPort: number;
      address: string;
      port: number;
      socket: string | null;
    }
  /** Other processes accept on `localPort` too: ask for its peers rather than take pushed ones. */
  | { type: 'shared'; localPort: number }
  /**
   * The answer to `file`: the errno the app's call fails with, or the file's stat; for `open`,
   * `size` bytes follow in `fileData` messages (for `list`, the entries: a kind letter, `f` `d`
   * `l` or `o`, the name and a NUL each); for `readlink`, `text` is the link's target.
   */
  | {
      type: 'fileReply';
      id: number;
      errno: string | null;
      stat: LayerStat | null;
      size: number;
      text: string | null;
    }
  | { type: 'fileData'; id: number; offset: number; bytes: Buffer };

const C = LayerCode;

export function sessionMessageToWire(m: SessionMessage): WireMessage {
  switch (m.type) {
    case 'peer':
      return [C.peer, m.sourcePort, m.localPort, m.address, m.port, m.socket];
    case 'shared':
      return [C.shared, m.localPort];
    case 'fileReply':
      return [C.fileReply, m.id, m.errno, m.stat, m.size, m.text];
    case 'fileData':
      return [C.fileData, m.id, m.offset, m.bytes];
  }
}

/** Validates one decoded message from the layer; throws {@link ProtocolError}. */
export function parseLayerMessage(value: unknown): LayerMessage {
  const w = messageCode(value);
  switch (w[0]) {
    case C.hello:
      arity(w, 'hello', 2);
      return { type: 'hello', pid: uint(w, 1, 'hello', 'pid'), token: str(w, 2, 'hello', 'token') };
    case C.listen: {
      arity(w, 'listen', 5);
      const family = w[4];
      if (family !== 4 && family !== 6) {
        throw new ProtocolError(`listen.family: expected 4 or 6, got ${String(family)}`);
      }
      return {
        type: 'listen',
        pid: uint(w, 1, 'listen', 'pid'),
        port: uint(w, 2, 'listen', 'port'),
        localPort: port(w, 3, 'listen', 'localPort'),
        family,
        address: str(w, 5, 'listen', 'address'),
      };
    }
    case C.close:
      arity(w, 'close', 2);
      return { type: 'close', pid: uint(w, 1, 'close', 'pid'), port: uint(w, 2, 'close', 'port') };
    case C.lookup:
      arity(w, 'lookup', 4);
      return {
        type: 'lookup',
        pid: uint(w, 1, 'lookup', 'pid'),
        sourcePort: port(w, 2, 'lookup', 'sourcePort'),
        localPort: port(w, 3, 'lookup', 'localPort'),
        socket: str(w, 4, 'lookup', 'socket'),
      };
    case C.file: {
      arity(w, 'file', 4);
      const op = str(w, 3, 'file', 'op');
      if (!(LAYER_FILE_OPS as readonly string[]).includes(op)) {
        throw new ProtocolError(`file.op: expected ${LAYER_FILE_OPS.join('|')}, got ${op}`);
      }
      return {
        type: 'file',
        pid: uint(w, 1, 'file', 'pid'),
        id: uint(w, 2, 'file', 'id'),
        op: op as LayerFileOp,
        path: str(w, 4, 'file', 'path'),
      };
    }
    default:
      throw new ProtocolError(`no layer message has code ${w[0]}`);
  }
}

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
  connect: 0x06,
  resolve: 0x07,
  peer: 0x10,
  shared: 0x11,
  fileReply: 0x12,
  fileData: 0x13,
  connected: 0x14,
  resolved: 0x15,
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
  | { type: 'file'; pid: number; id: number; op: LayerFileOp; path: string }
  /**
   * The app connects a socket (`tcp`), or sends from one (`udp`), to a destination that goes
   * through the target (src/features/outgoing/layer.ts); answered by `connected`. `family` is
   * the destination's (a v4-mapped one is sent as IPv4); the app's socket is bound to
   * `localAddress`:`localPort`: a loopback address for TCP, the relay then knows it by its port.
   */
  | {
      type: 'connect';
      pid: number;
      id: number;
      protocol: 'tcp' | 'udp';
      family: 4 | 6;
      address: string;
      port: number;
      localAddress: string;
      localPort: number;
    }
  /** The app looks a name up (`family` 0: any); answered by `resolved`. */
  | { type: 'resolve'; pid: number; id: number; name: string; family: 0 | 4 | 6 };

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
  | { type: 'fileData'; id: number; offset: number; bytes: Buffer }
  /**
   * The answer to `connect`: the errno the app's call fails with, or the port of the session's
   * relay on the loopback address of the destination's family, which the app's socket then
   * really connects or sends to, and where the target's socket is bound (getsockname's answer).
   */
  | {
      type: 'connected';
      id: number;
      errno: string | null;
      relayPort: number;
      localAddress: string | null;
      localPort: number;
    }
  /** The answer to `resolve`: getaddrinfo's error (`NONAME`, …) or the target's addresses. */
  | {
      type: 'resolved';
      id: number;
      error: string | null;
      canonicalName: string | null;
      addresses: string[];
    };

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
    case 'connected':
      return [C.connected, m.id, m.errno, m.relayPort, m.localAddress, m.localPort];
    case 'resolved':
      return [C.resolved, m.id, m.error, m.canonicalName, m.addresses];
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
    case C.connect: {
      arity(w, 'connect', 8);
      const protocol = str(w, 3, 'connect', 'protocol');
      if (protocol !== 'tcp' && protocol !== 'udp') {
        throw new ProtocolError(`connect.protocol: expected tcp or udp, got ${protocol}`);
      }
      const family = w[4];
      if (family !== 4 && family !== 6) {
        throw new ProtocolError(`connect.family: expected 4 or 6, got ${String(family)}`);
      }
      return {
        type: 'connect',
        pid: uint(w, 1, 'connect', 'pid'),
        id: uint(w, 2, 'connect', 'id'),
        protocol,
        family,
        address: str(w, 5, 'connect', 'address'),
        port: port(w, 6, 'connect', 'port'),
        localAddress: str(w, 7, 'connect', 'localAddress'),
        localPort: port(w, 8, 'connect', 'localPort'),
      };
    }
    case C.resolve: {
      arity(w, 'resolve', 4);
      const family = w[4];
      if (family !== 0 && family !== 4 && family !== 6) {
        throw new ProtocolError(`resolve.family: expected 0, 4 or 6, got ${String(family)}`);
      }
      return {
        type: 'resolve',
        pid: uint(w, 1, 'resolve', 'pid'),
        id: uint(w, 2, 'resolve', 'id'),
        name: str(w, 3, 'resolve', 'name'),
        family,
      };
    }
    default:
      throw new ProtocolError(`no layer message has code ${w[0]}`);
  }
}

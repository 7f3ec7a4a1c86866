/**
 * The `files` feature's messages: read-only operations on the target's file system, by path
 * as the target sees it (and by handle for an open file's reads). A request body is
 * `[operation, ...arguments]`; every reply body is `[errno, result]`: `errno` is null when the
 * operation succeeded, else the name the app's call fails with (`ENOENT`, `EACCES`, …), so a
 * missing file is an answer, not a failure of the feature.
 */
import { ProtocolError, type WireValue } from '../../protocol/messages.js';

export const FILES_FEATURE = 'files';

/** Most bytes one read returns: a reply stays one frame the client decodes at once. */
export const MAX_READ_BYTES = 1024 * 1024;

export type FileKind = 'file' | 'dir' | 'symlink' | 'other';
const KINDS: readonly FileKind[] = ['file', 'dir', 'symlink', 'other'];

/** What stat(2) says of a file, as the app's stat calls need it (times in ns since the epoch). */
export interface FileStat {
  kind: FileKind;
  /** The whole st_mode: type and permission bits. */
  mode: number;
  size: number;
  uid: number;
  gid: number;
  ino: number;
  nlink: number;
  dev: number;
  atimeNs: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

export type FileRequest =
  | { op: 'stat'; path: string; follow: boolean }
  | { op: 'open'; path: string }
  | { op: 'read'; handle: number; offset: number; length: number }
  | { op: 'close'; handle: number }
  | { op: 'list'; path: string }
  | { op: 'readlink'; path: string };

export interface FileResults {
  stat: FileStat;
  /**
   * The file's first bytes come with it (up to MAX_READ_BYTES): a small file takes one round
   * trip. When they are all of it, the agent has closed it already and `handle` is 0.
   */
  open: { handle: number; stat: FileStat; head: Buffer };
  read: Buffer;
  close: null;
  list: [name: string, kind: FileKind][];
  readlink: string;
}

/** An operation's outcome: its result, or the errno it fails with. */
export type FileReply<Op extends FileRequest['op']> =
  { errno: null; result: FileResults[Op] } | { errno: string; result: null };

export function fileRequestBody(request: FileRequest): WireValue {
  switch (request.op) {
    case 'stat':
      return ['stat', request.path, request.follow];
    case 'open':
    case 'list':
    case 'readlink':
      return [request.op, request.path];
    case 'read':
      return ['read', request.handle, request.offset, request.length];
    case 'close':
      return ['close', request.handle];
  }
}

function bad(what: string): never {
  throw new ProtocolError(`files: ${what}`);
}
const text = (v: unknown, what: string): string => (typeof v === 'string' ? v : bad(what));
const count = (v: unknown, what: string): number =>
  typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : bad(what);

/** Checks a request's body (the agent's side); throws {@link ProtocolError}. */
export function parseFileRequest(body: WireValue): FileRequest {
  if (!Array.isArray(body) || typeof body[0] !== 'string') bad('expected [operation, …]');
  const [op, a, b, c] = body as unknown[];
  switch (op) {
    case 'stat':
      if (typeof b !== 'boolean') bad('stat: expected a boolean follow');
      return { op, path: text(a, 'stat: expected a path'), follow: b };
    case 'open':
    case 'list':
    case 'readlink':
      return { op, path: text(a, `${op}: expected a path`) };
    case 'read': {
      const length = count(c, 'read: expected a length');
      if (length > MAX_READ_BYTES) bad(`read: at most ${MAX_READ_BYTES} bytes at once`);
      return {
        op,
        handle: count(a, 'read: expected a handle'),
        offset: count(b, 'read: expected an offset'),
        length,
      };
    }
    case 'close':
      return { op, handle: count(a, 'close: expected a handle') };
    default:
      return bad(`no operation ${String(op)}`);
  }
}

function statToWire(s: FileStat): WireValue {
  // Nanoseconds past 2^53 do not fit a double: times go as [seconds, nanoseconds].
  const time = (ns: bigint): WireValue => [
    Number(ns / 1_000_000_000n),
    Number(ns % 1_000_000_000n),
  ];
  return [
    s.kind,
    s.mode,
    s.size,
    s.uid,
    s.gid,
    s.ino,
    s.nlink,
    s.dev,
    time(s.atimeNs),
    time(s.mtimeNs),
    time(s.ctimeNs),
  ];
}

function statFromWire(v: unknown): FileStat {
  if (!Array.isArray(v) || v.length !== 11) bad('expected a stat');
  const kind = v[0] as FileKind;
  if (!KINDS.includes(kind)) bad(`unknown file kind ${String(v[0])}`);
  const time = (t: unknown): bigint => {
    if (!Array.isArray(t) || t.length !== 2) bad('expected [seconds, nanoseconds]');
    return BigInt(count(t[0], 'seconds')) * 1_000_000_000n + BigInt(count(t[1], 'nanoseconds'));
  };
  return {
    kind,
    mode: count(v[1], 'mode'),
    size: count(v[2], 'size'),
    uid: count(v[3], 'uid'),
    gid: count(v[4], 'gid'),
    ino: count(v[5], 'ino'),
    nlink: count(v[6], 'nlink'),
    dev: count(v[7], 'dev'),
    atimeNs: time(v[8]),
    mtimeNs: time(v[9]),
    ctimeNs: time(v[10]),
  };
}

/** The agent's reply body for an operation's outcome. */
export function fileReplyBody<Op extends FileRequest['op']>(
  op: Op,
  reply: FileReply<Op>,
): WireValue {
  if (reply.errno !== null) return [reply.errno, null];
  const result = reply.result as FileResults[FileRequest['op']];
  switch (op) {
    case 'stat':
      return [null, statToWire(result as FileStat)];
    case 'open': {
      const opened = result as FileResults['open'];
      return [null, [opened.handle, statToWire(opened.stat), opened.head]];
    }
    case 'list':
      return [null, result as FileResults['list']];
    default:
      return [null, result as Buffer | string | null];
  }
}

/** Checks the agent's reply to `op` (the CLI's side); throws {@link ProtocolError}. */
export function parseFileReply<Op extends FileRequest['op']>(
  op: Op,
  body: WireValue,
): FileReply<Op> {
  if (!Array.isArray(body) || body.length !== 2) bad(`${op} reply: expected [errno, result]`);
  const [errno, value] = body as unknown[];
  if (errno !== null)
    return { errno: text(errno, `${op} reply: expected an errno name`), result: null };
  const ok = (result: unknown) => ({ errno: null, result }) as FileReply<Op>;
  switch (op) {
    case 'stat':
      return ok(statFromWire(value));
    case 'open': {
      if (!Array.isArray(value) || value.length !== 3 || !(value[2] instanceof Uint8Array)) {
        bad('open reply: expected [handle, stat, head]');
      }
      const head = value[2] as Uint8Array;
      return ok({
        handle: count(value[0], 'open reply: handle'),
        stat: statFromWire(value[1]),
        head: Buffer.from(head.buffer, head.byteOffset, head.byteLength),
      });
    }
    case 'read':
      if (!(value instanceof Uint8Array)) bad('read reply: expected bytes');
      return ok(Buffer.from(value.buffer, value.byteOffset, value.byteLength));
    case 'close':
      return ok(null);
    case 'list':
      if (!Array.isArray(value)) bad('list reply: expected entries');
      return ok(
        value.map((entry: unknown) => {
          if (
            !Array.isArray(entry) ||
            typeof entry[0] !== 'string' ||
            !KINDS.includes(entry[1] as FileKind)
          ) {
            bad('list reply: expected [name, kind]');
          }
          return [entry[0], entry[1]];
        }),
      );
    case 'readlink':
      return ok(text(value, 'readlink reply: expected a string'));
    default:
      return bad(`no operation ${String(op)}`);
  }
}

/**
 * The agent's side of the `files` feature: the target's file system as the target sees it,
 * read-only. Every path is resolved from the target's root (`/proc/PID/root`, which shows its
 * mount namespace: its image, Secrets, ConfigMaps and volumes) by openat2 with
 * RESOLVE_IN_ROOT, so `..` and absolute symlinks resolve as they would in the target and can
 * never lead out of it; a /proc magic link that would is refused (EACCES, and a warning).
 */
import * as fs from 'node:fs';
import { constants, existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { getSystemErrorName, promisify } from 'node:util';
import { packageRoot } from '../../package-root.js';
import {
  MAX_READ_BYTES,
  type FileKind,
  type FileReply,
  type FileRequest,
  type FileResults,
  type FileStat,
} from './messages.js';

/** What in_root.cc's openInRoot gives: a negative errno, or the file (fd -1 once closed). */
type Opened = { errno: number } | { fd: number; stat: number[]; head?: Buffer };

/** What openInRoot does after the open (in_root.cc's After). */
const KEEP = 0;
const STAT = 1;
const HEAD = 2;

interface NativeFiles {
  openInRoot(
    root: string,
    path: string,
    flags: number,
    after: typeof KEEP | typeof STAT | typeof HEAD,
    headBytes: number,
  ): Promise<Opened>;
  /** The symlink's target, or -errno. */
  readLinkAt(fd: number): string | number;
}

let native: NativeFiles | undefined;
function loadNative(): NativeFiles {
  if (native) return native;
  const path = join(packageRoot(), 'build', 'Release', 'mirrord_files.node');
  if (!existsSync(path))
    throw new Error(`the files addon is not built (${path}); run npm run build`);
  native = createRequire(import.meta.url)(path) as NativeFiles;
  return native;
}

/** Files a session may hold open at once; one more open fails as the app's would (EMFILE). */
export const MAX_OPEN_FILES = 1024;

class Failure extends Error {
  constructor(readonly errno: string) {
    super(errno);
  }
}

const close = promisify(fs.close);
const read = promisify(fs.read);
/** Not in Node's constants: a descriptor that only names a file (Linux, every architecture but a few). */
const O_PATH = 0o10000000;

function kindOf(mode: number): FileKind {
  switch (mode & constants.S_IFMT) {
    case constants.S_IFREG:
      return 'file';
    case constants.S_IFDIR:
      return 'dir';
    case constants.S_IFLNK:
      return 'symlink';
    default:
      return 'other';
  }
}

/** in_root.cc's stat fields: mode, size, uid, gid, ino, nlink, dev, then seconds and ns of each time. */
function statOf(fields: number[]): FileStat {
  const [mode = 0, size = 0, uid = 0, gid = 0, ino = 0, nlink = 0, dev = 0] = fields;
  const time = (at: number): bigint =>
    BigInt(fields[at] ?? 0) * 1_000_000_000n + BigInt(fields[at + 1] ?? 0);
  return {
    kind: kindOf(mode),
    mode,
    size,
    uid,
    gid,
    ino,
    nlink,
    dev,
    atimeNs: time(7),
    mtimeNs: time(9),
    ctimeNs: time(11),
  };
}

function kindOfEntry(entry: fs.Dirent): FileKind {
  if (entry.isFile()) return 'file';
  if (entry.isDirectory()) return 'dir';
  return entry.isSymbolicLink() ? 'symlink' : 'other';
}

async function readAt(fd: number, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.allocUnsafe(Math.min(length, MAX_READ_BYTES));
  const { bytesRead } = await read(fd, buffer, 0, buffer.length, offset);
  return buffer.subarray(0, bytesRead);
}

export class TargetFiles {
  readonly #root: string;
  readonly #warn: (message: string) => void;
  readonly #open = new Map<number, number>();
  #nextHandle = 1;

  /** `pid`: a process of the target; `warn`: tells the session of a refused path. */
  constructor(pid: number, warn: (message: string) => void) {
    this.#root = `/proc/${pid}/root`;
    this.#warn = warn;
    loadNative();
  }

  async serve<Op extends FileRequest['op']>(
    request: FileRequest & { op: Op },
  ): Promise<FileReply<Op>> {
    try {
      return { errno: null, result: (await this.#run(request)) as FileResults[Op] };
    } catch (error) {
      if (error instanceof Failure) return { errno: error.errno, result: null };
      const code = (error as NodeJS.ErrnoException).code;
      if (code) return { errno: code, result: null };
      throw error;
    }
  }

  /** Closes what the session left open. */
  async close(): Promise<void> {
    const fds = [...this.#open.values()];
    this.#open.clear();
    await Promise.all(fds.map((fd) => close(fd).catch(() => undefined)));
  }

  async #run(request: FileRequest): Promise<FileResults[FileRequest['op']]> {
    switch (request.op) {
      case 'stat': {
        const flags = O_PATH | (request.follow ? 0 : constants.O_NOFOLLOW);
        return statOf((await this.#openInRoot(request.path, flags, STAT)).stat);
      }
      case 'open': {
        const opened = await this.#openInRoot(request.path, constants.O_RDONLY, HEAD);
        const result = {
          handle: 0,
          stat: statOf(opened.stat),
          head: opened.head ?? Buffer.alloc(0),
        };
        // Still open: there is more than the head to read, by handle.
        if (opened.fd >= 0) {
          if (this.#open.size >= MAX_OPEN_FILES) {
            await close(opened.fd);
            throw new Failure('EMFILE');
          }
          result.handle = this.#nextHandle++;
          this.#open.set(result.handle, opened.fd);
        }
        return result;
      }
      case 'read':
        return readAt(this.#fd(request.handle), request.offset, request.length);
      case 'close': {
        const fd = this.#fd(request.handle);
        this.#open.delete(request.handle);
        await close(fd);
        return null;
      }
      case 'list':
        return this.#with(
          request.path,
          constants.O_RDONLY | constants.O_DIRECTORY,
          async ({ fd }) => {
            const entries = await readdir(`/proc/self/fd/${fd}`, { withFileTypes: true });
            return entries.map((entry): [string, FileKind] => [entry.name, kindOfEntry(entry)]);
          },
        );
      case 'readlink':
        return this.#with(request.path, O_PATH | constants.O_NOFOLLOW, async ({ fd, stat }) => {
          // readlink(2) of what is not a link is EINVAL; readlinkat on its descriptor says ENOENT.
          if (statOf(stat).kind !== 'symlink') throw new Failure('EINVAL');
          const target = loadNative().readLinkAt(fd);
          if (typeof target === 'number') throw new Failure(getSystemErrorName(target));
          return target;
        });
    }
  }

  #fd(handle: number): number {
    const fd = this.#open.get(handle);
    if (fd === undefined) throw new Failure('EBADF');
    return fd;
  }

  async #with<T>(
    path: string,
    flags: number,
    use: (opened: { fd: number; stat: number[] }) => Promise<T>,
  ): Promise<T> {
    const opened = await this.#openInRoot(path, flags, KEEP);
    try {
      return await use(opened);
    } finally {
      await close(opened.fd);
    }
  }

  async #openInRoot(
    path: string,
    flags: number,
    after: typeof KEEP | typeof STAT | typeof HEAD,
  ): Promise<{ fd: number; stat: number[]; head?: Buffer }> {
    // openat2 refuses any flag but O_DIRECTORY and O_NOFOLLOW beside O_PATH; O_NOCTTY keeps a
    // terminal of the target's from becoming the agent's.
    const opened = await loadNative().openInRoot(
      this.#root,
      path,
      flags & O_PATH ? flags : flags | constants.O_NOCTTY,
      after,
      after === HEAD ? MAX_READ_BYTES : 0,
    );
    if (!('errno' in opened)) return opened;
    const errno = getSystemErrorName(opened.errno);
    // RESOLVE_NO_MAGICLINKS and a loop of symlinks both say ELOOP; either way the app gets
    // the refusal a sandbox gives, and the session a line saying which path.
    if (errno === 'ELOOP') {
      this.#warn(
        `refused ${path}: it resolves through a /proc link out of the target's root, or a symlink loop`,
      );
      throw new Failure('EACCES');
    }
    throw new Failure(errno);
  }
}

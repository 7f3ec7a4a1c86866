/**
 * Whether the layer can hook a program, told from its file without running it. The layer is an
 * LD_PRELOAD library: it sees the calls a program makes through a libc that the dynamic loader
 * linked to it. A statically linked program has no dynamic loader, so nothing is preloaded into
 * it; a Go program, even dynamically linked (cgo), makes its network and file system calls as
 * system calls of its own runtime, never through libc.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { basename } from 'node:path';
import { commandPath } from './mirror-settings.js';

/**
 * What it means for a program that the layer cannot hook it, for `mirror`'s warning and
 * `doctor`'s check: the CLI sets the environment at exec and replays a --port mapping into a
 * local port with no help from the layer; everything else (the target's files, outgoing
 * connections and DNS, the ports the app listens on, the original client in accept) is the
 * layer's.
 */
export const UNHOOKABLE_MEANS =
  "the layer cannot hook it, so it gets none of the target's files, outgoing connections or DNS, the ports it listens on are not seen (only --port REMOTE[:LOCAL] mirrors into it), and replayed connections reach it from this machine, not from their clients; its environment is set as usual";

/** How much of a file the kernel reads to recognise it, a `#!` line included (BINPRM_BUF_SIZE). */
const HEAD_SIZE = 256;
/** More than any table of headers or section names of a real program. */
const MAX_READ = 16 * 1024 * 1024;
const ELF_MAGIC = Buffer.from('\x7fELF', 'latin1');
const PT_INTERP = 3;
/** Sections that only Go's linker writes: the build information and the Go build ID note. */
const GO_SECTIONS = new Set(['.go.buildinfo', '.note.go.buildid']);

/** Where the fields read here are, in one ELF class. */
interface ElfLayout {
  /** The size of an offset: e_phoff, e_shoff, sh_offset and sh_size. */
  offsetSize: 4 | 8;
  /** In the ELF header. */
  phoff: number;
  shoff: number;
  phentsize: number;
  phnum: number;
  shentsize: number;
  shnum: number;
  shstrndx: number;
  headerSize: number;
  /** In a section header, whose first field is sh_name in both classes. */
  shOffset: number;
  shSize: number;
}

/** By e_ident[EI_CLASS]: ELFCLASS32, ELFCLASS64. */
const LAYOUTS: Record<number, ElfLayout> = {
  1: {
    offsetSize: 4,
    phoff: 0x1c,
    shoff: 0x20,
    phentsize: 0x2a,
    phnum: 0x2c,
    shentsize: 0x2e,
    shnum: 0x30,
    shstrndx: 0x32,
    headerSize: 52,
    shOffset: 0x10,
    shSize: 0x14,
  },
  2: {
    offsetSize: 8,
    phoff: 0x20,
    shoff: 0x28,
    phentsize: 0x36,
    phnum: 0x38,
    shentsize: 0x3a,
    shnum: 0x3c,
    shstrndx: 0x3e,
    headerSize: 64,
    shOffset: 0x18,
    shSize: 0x20,
  },
};

/**
 * COMMAND as `mirror` runs it (the file execvp runs, found as commandPath finds it): how to name
 * it to the user (`NAME (PATH)` for a name found on PATH) and why the layer cannot hook it
 * (undefined when it can); undefined when nothing would run.
 */
export function commandHookability(
  file: string,
): { shown: string; reason: string | undefined } | undefined {
  const path = commandPath(file);
  if (path === undefined) return undefined;
  return { shown: path === file ? file : `${file} (${path})`, reason: unhookableReason(path) };
}

/**
 * Why the layer cannot hook the program at `path` ("a Go program", "statically linked"), or
 * undefined when it can. A `#!` script is its interpreter's case (one level: an interpreter that
 * is a script itself is not looked into). Whatever cannot be read or is not an ELF file is
 * undefined too: this only warns, and exec has the last word.
 */
export function unhookableReason(path: string): string | undefined {
  try {
    return withFile(path, (file) => {
      const head = readAt(file, 0, HEAD_SIZE, false);
      if (head.toString('latin1', 0, 2) === '#!') return scriptReason(head);
      return elfReason(file, head);
    });
  } catch {
    return undefined;
  }
}

/** A script's reason: its interpreter's, when that is an ELF file the layer cannot hook. */
function scriptReason(head: Buffer): string | undefined {
  const interpreter = interpreterOf(head);
  if (interpreter === undefined) return undefined;
  const reason = withFile(interpreter, (file) =>
    elfReason(file, readAt(file, 0, HEAD_SIZE, false)),
  );
  return reason && `a script run by ${interpreter}, which is ${reason}`;
}

/**
 * The program a `#!` line names; for `#!/usr/bin/env [-S] [NAME=VALUE…] NAME`, NAME as env's
 * execvp finds it on PATH.
 */
function interpreterOf(head: Buffer): string | undefined {
  const line = head.toString('latin1', 2).split('\n')[0] ?? '';
  const [interpreter, ...args] = line.trim().split(/[ \t]+/);
  if (!interpreter) return undefined;
  if (basename(interpreter) !== 'env') return interpreter;
  const name = args.find((arg) => !arg.startsWith('-') && !arg.includes('='));
  return name === undefined ? undefined : commandPath(name);
}

/** Reads the fields of one ELF file in its class and byte order. */
class ElfReader {
  readonly layout: ElfLayout;
  readonly #littleEndian: boolean;

  /** undefined when `ident` (e_ident) is not one of an ELF file this can read. */
  static of(ident: Buffer): ElfReader | undefined {
    if (!ident.subarray(0, 4).equals(ELF_MAGIC)) return undefined;
    const layout = LAYOUTS[ident[4] ?? 0];
    // e_ident[EI_DATA]: ELFDATA2LSB, ELFDATA2MSB.
    const data = ident[5];
    if (!layout || (data !== 1 && data !== 2)) return undefined;
    return new ElfReader(layout, data === 1);
  }

  private constructor(layout: ElfLayout, littleEndian: boolean) {
    this.layout = layout;
    this.#littleEndian = littleEndian;
  }

  /** The unsigned field of `size` bytes at `at` in `buffer`. */
  field(buffer: Buffer, at: number, size: 2 | 4 | 8): number {
    const little = this.#littleEndian;
    if (size === 2) return little ? buffer.readUInt16LE(at) : buffer.readUInt16BE(at);
    if (size === 4) return little ? buffer.readUInt32LE(at) : buffer.readUInt32BE(at);
    return Number(little ? buffer.readBigUInt64LE(at) : buffer.readBigUInt64BE(at));
  }
}

/** An ELF file's reason (see unhookableReason), from its first bytes `head` and its headers. */
function elfReason(file: number, head: Buffer): string | undefined {
  const elf = ElfReader.of(head);
  if (!elf || head.length < elf.layout.headerSize) return undefined;
  if (sectionNames(file, elf, head).some((name) => GO_SECTIONS.has(name))) return 'a Go program';
  // PT_INTERP names the dynamic loader, the one that preloads the layer.
  if (!programHeaderTypes(file, elf, head).includes(PT_INTERP)) return 'statically linked';
  return undefined;
}

function programHeaderTypes(file: number, elf: ElfReader, header: Buffer): number[] {
  const { phoff, phentsize, phnum, offsetSize } = elf.layout;
  const entrySize = elf.field(header, phentsize, 2);
  const count = elf.field(header, phnum, 2);
  const table = readAt(file, elf.field(header, phoff, offsetSize), entrySize * count);
  // p_type is the first field of a program header in both classes.
  return Array.from({ length: count }, (_, i) => elf.field(table, i * entrySize, 4));
}

/**
 * The names of the sections, from the section header string table. A file with more sections
 * than e_shnum holds (0xff00 or more, which keeps the count elsewhere) is read as having none.
 */
function sectionNames(file: number, elf: ElfReader, header: Buffer): string[] {
  const { shoff, shentsize, shnum, shstrndx, offsetSize, shOffset, shSize } = elf.layout;
  const entrySize = elf.field(header, shentsize, 2);
  const count = elf.field(header, shnum, 2);
  const namesIndex = elf.field(header, shstrndx, 2);
  if (count === 0 || namesIndex >= count) return [];
  const table = readAt(file, elf.field(header, shoff, offsetSize), entrySize * count);
  const namesAt = namesIndex * entrySize;
  const names = readAt(
    file,
    elf.field(table, namesAt + shOffset, offsetSize),
    elf.field(table, namesAt + shSize, offsetSize),
  );
  return Array.from({ length: count }, (_, i) => {
    // sh_name: the offset of the section's name, NUL-terminated, in the string table.
    const start = elf.field(table, i * entrySize, 4);
    const end = names.indexOf(0, start);
    return names.toString('latin1', start, end < 0 ? names.length : end);
  });
}

function withFile<T>(path: string, use: (file: number) => T): T {
  const file = openSync(path, 'r');
  try {
    return use(file);
  } finally {
    closeSync(file);
  }
}

/**
 * `length` bytes at `position`; fewer only at the end of the file when `exact` is false. A
 * corrupt header may give any length: more than MAX_READ is not read.
 */
function readAt(file: number, position: number, length: number, exact = true): Buffer {
  if (length > MAX_READ) throw new RangeError(`${length} bytes is more than a header`);
  const buffer = Buffer.alloc(length);
  const read = readSync(file, buffer, 0, length, position);
  if (exact && read < length)
    throw new RangeError(`the file ends before byte ${position + length}`);
  return buffer.subarray(0, read);
}

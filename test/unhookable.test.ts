/**
 * Programs the layer cannot hook, built here for real: a static C program, Go programs without
 * and with cgo (and one for a big-endian machine), 32-bit ELF files, and scripts. What
 * unhookableReason says of each, and what a user sees: `mirrord doctor -- COMMAND` and the
 * warning of `mirrord mirror`.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { UNHOOKABLE_MEANS, unhookableReason } from '../src/cli/unhookable.js';
import { CLI, mirrord, tempDir, type MirrorRun } from './support/mirror-cli.js';
import { runToEnd, type Run } from './support/processes.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

interface ProgramCheck {
  id: string;
  status: 'ok' | 'warn' | 'fail';
  detail: string;
  fix?: string;
}

const dir = tempDir('unhookable');
/** Where the programs are built, by what they are. */
const programs = {
  staticC: join(dir.path, 'static-c'),
  dynamicC: join(dir.path, 'dynamic-c'),
  goStatic: join(dir.path, 'go-static'),
  goCgo: join(dir.path, 'go-cgo'),
  goBigEndian: join(dir.path, 'go-s390x'),
  static32: join(dir.path, 'static-i386'),
  dynamic32: join(dir.path, 'dynamic-i386'),
  envPython: join(dir.path, 'env-python3'),
  onStaticC: join(dir.path, 'on-static-c'),
  envStaticC: join(dir.path, 'env-static-c'),
};
/** The build's own cache and module path, removed with the directory. */
const GO_ENV = {
  GOCACHE: join(dir.path, 'go-cache'),
  GOPATH: join(dir.path, 'go-path'),
  GOFLAGS: '-mod=mod',
};

/** A Go program in a module of its own (a directory's .c files would be taken for cgo's). */
function buildGo(output: string, source: string, env: Record<string, string>): void {
  const module = `${output}-src`;
  mkdirSync(module);
  writeFileSync(join(module, 'go.mod'), 'module example.com/unhookable\n\ngo 1.22\n');
  writeFileSync(join(module, 'main.go'), source);
  execFileSync('go', ['build', '-o', output, '.'], {
    cwd: module,
    env: { ...process.env, ...GO_ENV, ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
}

function script(path: string, text: string): void {
  writeFileSync(path, text);
  chmodSync(path, 0o755);
}

beforeAll(() => {
  const c = join(dir.path, 'exit.c');
  writeFileSync(c, 'int main(void) { return 0; }\n');
  execFileSync('gcc', ['-static', '-o', programs.staticC, c]);
  execFileSync('gcc', ['-o', programs.dynamicC, c]);
  const empty = 'package main\n\nfunc main() {}\n';
  buildGo(programs.goStatic, empty, { CGO_ENABLED: '0' });
  // import "C": linked by the system's linker against libc, with an ELF interpreter.
  buildGo(programs.goCgo, 'package main\n\nimport "C"\n\nfunc main() {}\n', { CGO_ENABLED: '1' });
  buildGo(programs.goBigEndian, empty, { CGO_ENABLED: '0', GOARCH: 's390x' });
  // 32-bit: no 32-bit libc here to link a C program with, but as and ld make both kinds.
  const asm = join(dir.path, 'start.s');
  const object = join(dir.path, 'start.o');
  writeFileSync(asm, '.globl _start\n_start:\n  hlt\n');
  execFileSync('as', ['--32', '-o', object, asm]);
  execFileSync('ld', ['-m', 'elf_i386', '-o', programs.static32, object]);
  const interpreter = ['-pie', '-dynamic-linker', '/lib/ld-linux.so.2'];
  execFileSync('ld', ['-m', 'elf_i386', ...interpreter, '-o', programs.dynamic32, object]);
  script(programs.envPython, '#!/usr/bin/env python3\nprint("hello")\n');
  script(programs.onStaticC, `#!${programs.staticC} --some-flag\n`);
  script(programs.envStaticC, '#!/usr/bin/env -S LANG=C static-c --some-flag\n');
}, 300_000);

afterAll(() => dir.remove());

/** With `dir` first on PATH, so that its programs are found by name. */
function withDirOnPath<T>(use: () => T): T {
  const saved = process.env.PATH;
  process.env.PATH = `${dir.path}:${saved ?? ''}`;
  try {
    return use();
  } finally {
    process.env.PATH = saved;
  }
}

describe('unhookableReason', () => {
  test('C: statically linked or not', () => {
    expect(unhookableReason(programs.staticC)).toBe('statically linked');
    expect(unhookableReason(programs.dynamicC)).toBeUndefined();
  });

  test('Go: without cgo, with cgo (dynamically linked), and built for big-endian s390x', () => {
    expect(execFileSync('file', ['-b', programs.goCgo], { encoding: 'utf8' })).toMatch(
      /dynamically linked/,
    );
    expect(unhookableReason(programs.goStatic)).toBe('a Go program');
    expect(unhookableReason(programs.goCgo)).toBe('a Go program');
    expect(unhookableReason(programs.goBigEndian)).toBe('a Go program');
  });

  test('32-bit: statically linked or not', () => {
    expect(unhookableReason(programs.static32)).toBe('statically linked');
    expect(unhookableReason(programs.dynamic32)).toBeUndefined();
  });

  test('a script is its interpreter’s case; /usr/bin/env NAME is looked for on PATH', () => {
    expect(unhookableReason(programs.envPython)).toBeUndefined();
    expect(unhookableReason(programs.onStaticC)).toBe(
      `a script run by ${programs.staticC}, which is statically linked`,
    );
    expect(withDirOnPath(() => unhookableReason(programs.envStaticC))).toBe(
      `a script run by ${programs.staticC}, which is statically linked`,
    );
    // One level: a script run by a script is not looked into further.
    const onScript = join(dir.path, 'on-script');
    script(onScript, `#!${programs.onStaticC}\n`);
    expect(unhookableReason(onScript)).toBeUndefined();
  });

  test('what cannot be read, or is no ELF file, is never a reason', () => {
    const truncated = join(dir.path, 'truncated');
    writeFileSync(truncated, execFileSync('head', ['-c', '100', programs.goStatic]));
    const text = join(dir.path, 'text');
    writeFileSync(text, 'not a program\n');
    const empty = join(dir.path, 'empty');
    writeFileSync(empty, '');
    const missingInterpreter = join(dir.path, 'on-nothing');
    script(missingInterpreter, `#!${join(dir.path, 'nothing')}\n`);
    for (const path of [
      truncated,
      text,
      empty,
      missingInterpreter,
      dir.path,
      join(dir.path, 'nothing'),
    ]) {
      expect([path, unhookableReason(path)]).toEqual([path, undefined]);
    }
  });
});

/** `mirrord doctor ARGS`, with no kubeconfig to look for and `dir` first on PATH. */
function doctor(args: string[]): Promise<Run> {
  return runToEnd(process.execPath, [CLI, 'doctor', ...args], {
    ...process.env,
    KUBECONFIG: join(dir.path, 'no-kubeconfig'),
    PATH: `${dir.path}:${process.env.PATH ?? ''}`,
  });
}

/** The `program` check of `mirrord doctor --json -- COMMAND`, and doctor's exit code. */
async function programCheck(command: string): Promise<{ code: number | null } & ProgramCheck> {
  const run = await doctor(['--json', '--', command, '--json']);
  expect(run.stderr).toBe('');
  const report = JSON.parse(run.stdout) as { checks: ProgramCheck[] };
  const check = report.checks.find((one) => one.id === 'program');
  if (!check) throw new Error(`no program check in ${run.stdout}`);
  return { code: run.code, ...check };
}

describe('mirrord doctor -- COMMAND', () => {
  /**
   * doctor's exit code without COMMAND: the machine's own checks decide it (0 as root with the
   * build in place); a program's warning must not change it, a program not found makes it 1.
   */
  let machineCode: number | null;

  beforeAll(async () => {
    machineCode = (await doctor([])).code;
  });

  test('a Go program: warn with what it means and what to do; the exit code is the machine’s', async () => {
    const run = await doctor(['--', programs.goStatic]);
    expect(run.code).toBe(machineCode);
    expect(run.stdout).toMatch(
      new RegExp(
        `^warn +program +${programs.goStatic} is a Go program: the layer cannot hook it`,
        'm',
      ),
    );
    const check = await programCheck(programs.goStatic);
    expect(check).toEqual({
      code: machineCode,
      id: 'program',
      title: 'program',
      status: 'warn',
      detail: `${programs.goStatic} is a Go program: ${UNHOOKABLE_MEANS}`,
      fix: expect.stringMatching(/^mirror into it with --port REMOTE\[:LOCAL\]/),
    });
    // The fix, on the line below the check's.
    expect(run.stdout).toContain(`fix: ${check.fix}\n`);
  });

  test('every kind of program, by path and by name on PATH', async () => {
    const expected: [string, ProgramCheck['status'], string][] = [
      [programs.goCgo, 'warn', `${programs.goCgo} is a Go program: `],
      [programs.staticC, 'warn', `${programs.staticC} is statically linked: `],
      [
        'static-c',
        'warn',
        `static-c (${programs.staticC}) is statically linked: the layer cannot hook it`,
      ],
      [
        programs.envStaticC,
        'warn',
        `${programs.envStaticC} is a script run by ${programs.staticC}, which is statically linked: `,
      ],
      [programs.dynamicC, 'ok', `${programs.dynamicC}: the layer can hook it`],
      [programs.envPython, 'ok', `${programs.envPython}: the layer can hook it`],
    ];
    for (const [command, status, detail] of expected) {
      const check = await programCheck(command);
      expect([command, check.status, check.detail.slice(0, detail.length)]).toEqual([
        command,
        status,
        detail,
      ]);
      expect([command, check.code]).toEqual([command, machineCode]);
    }
  });

  test('a program that is not there fails, exit 1', async () => {
    const check = await programCheck('no-such-program-here');
    expect(check).toMatchObject({
      code: 1,
      status: 'fail',
      detail:
        'command not found: no-such-program-here (not in PATH): check the name, or give its path',
    });
  });

  test('an argument before -- is refused, as mirror refuses it', async () => {
    const run = await doctor([programs.goStatic]);
    expect(run.code).toBe(2);
    expect(run.stderr).toMatch(
      /^mirrord: unexpected argument ".*go-static": a COMMAND to check goes after --/,
    );
  });
});

describe('mirrord mirror -- COMMAND', () => {
  let sandbox: Sandbox | undefined;
  const runs: MirrorRun[] = [];

  afterEach(async () => {
    for (const run of runs.splice(0)) {
      run.child.kill('SIGKILL');
      await run.exited;
    }
    sandbox?.destroy();
    sandbox = undefined;
  });

  /** A session with a program that exits at once: its exit code and mirror's stderr. */
  async function mirrorOnce(command: string): Promise<{ code: number | null; stderr: string }> {
    sandbox ??= createSandbox('unhookable');
    const run = mirrord(['--netns', sandbox.target, '--', command]);
    runs.push(run);
    let stderr = '';
    run.child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    return { code: await run.exited, stderr };
  }

  test('a Go program: one warning line before the session starts, and the session runs', async () => {
    const { code, stderr } = await mirrorOnce(programs.goCgo);
    expect({ code, stderr }).toMatchObject({ code: 0 });
    const lines = stderr.split('\n');
    expect(lines.filter((line) => line.includes('warning'))).toEqual([
      `mirrord: warning: COMMAND ${programs.goCgo} is a Go program: ${UNHOOKABLE_MEANS}`,
    ]);
    expect(lines[0]).toMatch(/^mirrord: warning: /);
    expect(stderr).toContain(`mirrord: mirroring netns ${sandbox!.target}`);
  });

  test('a dynamically linked C program: no warning', async () => {
    const { code, stderr } = await mirrorOnce(programs.dynamicC);
    expect({ code, stderr }).toMatchObject({ code: 0 });
    expect(stderr).toContain(`mirrord: mirroring netns ${sandbox!.target}`);
    expect(stderr).not.toContain('warning');
  });
});

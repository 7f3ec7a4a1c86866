/**
 * `mirrord mirror` in a real terminal (tmux, read back with capture-pane) and with its output
 * piped: the live status fits the terminal and stays below the app's output, no stale status
 * row is left behind, every line the app printed is intact (also one it left unfinished for a
 * while), the last line tells what the session did, and kill -9 of mirror still ends the app;
 * piped, the app's output passes through byte for byte; connections open before mirroring are
 * told of once. Real traffic from a sandbox netns, a real node app under the layer.
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { waitForTcp } from '../src/platform/local/netns.js';
import { midStreamNotice } from '../src/cli/status-line.js';
import { commandLine } from './support/processes.js';
import {
  CLI,
  agentsOf,
  killMatching,
  logLines,
  mirrord,
  mirrorInto,
  processesMatching,
  tempDir,
  until,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { stdinClient } from './support/programs.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const PORT = 38100 + Math.floor(Math.random() * 400);
const PARTIAL = 'partial line: waiting for /finish';
const FINISHED = `${PARTIAL} ... finished`;

/**
 * The local app: an HTTP server that prints a line per request on stdout and one on stderr,
 * leaves a line unfinished on /partial until /finish, prints nothing for /quiet and exits with
 * 7 on /exit. Every complete line it prints is also appended to LOG, first: what it printed.
 */
const APP = `
const http = require('http');
const fs = require('fs');
const [port, log] = process.argv.slice(2);
const print = (stream, line) => { fs.appendFileSync(log, line + '\\n'); stream.write(line + '\\n'); };
let n = 0;
http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.end('local');
    if (req.url === '/quiet') return;
    if (req.url === '/partial') return process.stdout.write(${JSON.stringify(PARTIAL)});
    if (req.url === '/finish') {
      fs.appendFileSync(log, ${JSON.stringify(FINISHED)} + '\\n');
      return process.stdout.write(' ... finished\\n');
    }
    if (req.url === '/exit') {
      print(process.stdout, 'app: exiting on /exit');
      return setTimeout(() => process.exit(7), 20);
    }
    n += 1;
    print(process.stdout, 'app: request ' + n + ' ' + req.url + ' from ' + req.socket.remoteAddress);
    print(process.stderr, 'app: (stderr) request ' + n + ' done');
  });
}).listen(Number(port), () => print(process.stdout, 'app: listening on ' + port));
`;

const EXITED = /^\[exited with (\d+)\]$/;

/**
 * A tmux server of its own, with one window that runs `command` through a shell, which then
 * prints "[exited with CODE]". The code is read from the screen, not from tmux: tmux 3.3 at
 * times never collects the exit status of a pane's process (pane_dead_status stays empty, the
 * process a zombie). The shell's trap lets Ctrl-C reach the command and the shell go on after.
 */
class Terminal {
  static #count = 0;
  readonly #socket = `mirrord-test-${process.pid}-${++Terminal.#count}`;

  constructor(columns: number, command: string[], dir: string) {
    const config = join(dir, `tmux-${this.#socket}.conf`);
    // No status bar: every row is the program's. The pane stays after the shell exits.
    writeFileSync(
      config,
      'set -g status off\nset -g remain-on-exit on\nset -g history-limit 5000\n',
    );
    const quoted = command.map((arg) => `'${arg.replace(/'/g, `'\\''`)}'`).join(' ');
    execFileSync('tmux', [
      '-L',
      this.#socket,
      '-f',
      config,
      'new-session',
      '-d',
      '-s',
      'mirror',
      '-x',
      String(columns),
      '-y',
      '40',
      `trap : INT; ${quoted}; echo "[exited with $?]"`,
    ]);
  }

  #tmux(args: string[]): string {
    return execFileSync('tmux', ['-L', this.#socket, ...args], { encoding: 'utf8' });
  }

  /** Every row, scrolled off or on screen, with the rows a long line wrapped into joined. */
  rows(): string[] {
    const rows = this.#tmux(['capture-pane', '-p', '-J', '-S', '-', '-t', 'mirror'])
      .split('\n')
      .map((row) => row.trimEnd());
    while (rows.length && (rows.at(-1) === '' || rows.at(-1)!.startsWith('Pane is dead'))) {
      rows.pop();
    }
    return rows;
  }

  cursorColumn(): number {
    return Number(this.#tmux(['display-message', '-p', '-t', 'mirror', '#{cursor_x}']).trim());
  }

  /** mirror's exit code, once it exited. */
  exitStatus(rows = this.rows()): number | undefined {
    const exited = rows.map((row) => EXITED.exec(row)).find((match) => match !== null);
    return exited ? Number(exited[1]) : undefined;
  }

  resize(columns: number): void {
    this.#tmux(['resize-window', '-t', 'mirror', '-x', String(columns)]);
  }

  /** Ctrl-C, as a user stops mirror. */
  interrupt(): void {
    this.#tmux(['send-keys', '-t', 'mirror', 'C-c']);
  }

  kill(): void {
    this.#tmux(['kill-server']);
  }
}

describe('mirror on a terminal', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const terminals: Terminal[] = [];
  const runs: MirrorRun[] = [];
  const clients: ChildProcess[] = [];

  beforeEach(async () => {
    dir = tempDir('terminal');
    sandbox = createSandbox('term');
    // Staging: answers every request.
    sandbox.spawn(sandbox.target, process.execPath, [
      '-e',
      `require('http').createServer((q, r) => { q.resume(); q.on('end', () => r.end('staging')); }).listen(${PORT});`,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, PORT);
  });

  afterEach(async () => {
    try {
      for (const terminal of terminals.splice(0)) {
        try {
          if (terminal.exitStatus() === undefined) {
            terminal.interrupt();
            await until(() => terminal.exitStatus() !== undefined, 'mirror to stop on Ctrl-C');
          }
        } finally {
          terminal.kill();
        }
      }
      for (const run of runs.splice(0)) {
        run.child.kill('SIGKILL');
        await run.exited;
      }
      for (const client of clients.splice(0)) client.kill('SIGKILL');
      await until(() => agentsOf(sandbox.target).length === 0, 'the agent to exit');
    } finally {
      sandbox.destroy();
      dir.remove();
    }
  });

  const curl = (path: string): Promise<string> =>
    sandbox.runAsync(sandbox.client, 'curl', [
      '-s',
      '--max-time',
      '5',
      `http://${sandbox.targetAddress}:${PORT}${path}`,
    ]);

  /**
   * Requests `path` from the target until the app's log has a line with it: the port is copied
   * once the agent acknowledged its subscription, a moment after the app listens.
   */
  async function untilReplayed(log: string, path: string): Promise<void> {
    const deadline = Date.now() + 30_000;
    for (;;) {
      expect(await curl(path)).toBe('staging');
      try {
        await until(() => logLines(log).some((l) => l.includes(` ${path} from `)), path, 1_000);
        return;
      } catch (error) {
        if (Date.now() > deadline) throw error;
      }
    }
  }

  test.each([
    { columns: 80, end: 'the app exits' },
    { columns: 250, narrowedTo: 100, end: 'Ctrl-C' },
  ])(
    'at $columns columns, until $end: a status that never wraps, below the app’s intact lines, and a last line',
    async ({ columns, narrowedTo, end }) => {
      const log = join(dir.path, 'app.log');
      const app = join(dir.path, 'app.js');
      writeFileSync(app, APP);
      const command = [
        process.execPath,
        CLI,
        'mirror',
        '--netns',
        sandbox.target,
        '--',
        process.execPath,
        app,
        String(PORT),
        log,
      ];
      const terminal = new Terminal(columns, command, dir.path);
      terminals.push(terminal);
      const target = `netns ${sandbox.target}`;
      /** The live status, and once mirror exited its last line: rows that start with the target. */
      const isStatus = (row: string): boolean => row.startsWith(`mirrord: ${target}`);
      /** The live status alone: it counts the open connections, the last line does not. */
      const isLive = (row: string): boolean => isStatus(row) && / \(\d+ open\)/.test(row);
      let screen: string[] = [];
      let width = columns;

      /**
       * Reads the screen until `condition` holds, checking on every read what must always hold:
       * at most one live status row (no stale ones), never wrapped, the last row while mirror
       * runs, and none once it exited.
       */
      async function untilScreen(condition: (rows: string[]) => boolean, what: string) {
        await until(
          () => {
            screen = terminal.rows();
            const live = screen.filter(isLive);
            const running = terminal.exitStatus(screen) === undefined;
            const problem =
              live.length > (running ? 1 : 0)
                ? 'a stale status row'
                : live.some((row) => row.length > width - 1)
                  ? 'a status row as wide as the terminal, or wrapped'
                  : live.length === 1 && !isLive(screen.at(-1)!)
                    ? 'output below the status'
                    : undefined;
            if (problem) throw new Error(problem);
            return condition(screen);
          },
          what,
          30_000,
        ).catch((error: Error) => {
          throw new Error(`${error.message}\n--- the screen:\n${screen.join('\n')}`);
        });
      }
      /** Every complete line the app printed is a row of its own, exactly as printed. */
      const appLinesIntact = (rows: string[]): boolean => {
        const left = new Map<string, number>();
        for (const row of rows) left.set(row, (left.get(row) ?? 0) + 1);
        return logLines(log).every((line) => {
          const n = left.get(line) ?? 0;
          left.set(line, n - 1);
          return n > 0;
        });
      };
      const statusRow = (rows: string[]): string | undefined => rows.find(isLive);
      const connections = (row: string | undefined): number =>
        Number(/([\d,]+) connections? \(/.exec(row ?? '')?.[1]?.replace(/,/g, '') ?? -1);

      await untilScreen(
        (rows) => rows.includes(`mirrord: the app listens on ${PORT}: mirroring it`),
        'the app to listen',
      );
      await untilReplayed(log, '/warmup');
      // The app's next lines come while the status is drawn, where they are to go.
      await untilScreen((rows) => isLive(rows.at(-1) ?? ''), 'the status');
      // Short lines, one longer than the terminal is wide, on stdout and on stderr.
      for (const path of ['/one', `/long-${'x'.repeat(columns)}`, '/three']) {
        expect(await curl(path)).toBe('staging');
      }
      await untilScreen(
        (rows) =>
          logLines(log).length >= 8 && appLinesIntact(rows) && statusRow(rows) !== undefined,
        'every line the app printed, and the status below them',
      );
      if (narrowedTo) {
        // With room, everything; the terminal narrowed, the status is redrawn to its width.
        expect(statusRow(screen)).toContain(`port ${PORT}`);
        terminal.resize(narrowedTo);
        await until(
          () => (statusRow(terminal.rows())?.length ?? Infinity) <= narrowedTo - 1,
          'the status to fit the narrower terminal',
        );
        width = narrowedTo;
        await untilScreen(appLinesIntact, 'the app’s lines after the resize');
      }

      // A line the app leaves unfinished: the status goes below it, the cursor stays at its end.
      expect(await curl('/partial')).toBe('staging');
      await untilScreen((rows) => {
        const at = rows.indexOf(PARTIAL);
        return at >= 0 && isLive(rows[at + 1] ?? '') && terminal.cursorColumn() === PARTIAL.length;
      }, 'the status below the unfinished line');
      // The status changes while the line is unfinished: it is redrawn there, not into it.
      const before = connections(statusRow(screen));
      expect(before).toBeGreaterThan(0);
      expect(await curl('/quiet')).toBe('staging');
      await untilScreen((rows) => {
        const at = rows.indexOf(PARTIAL);
        return at >= 0 && connections(rows[at + 1]) > before;
      }, 'the status redrawn below the unfinished line');
      expect(terminal.cursorColumn()).toBe(PARTIAL.length);
      expect(await curl('/finish')).toBe('staging');
      await untilScreen(
        (rows) => rows.includes(FINISHED) && appLinesIntact(rows),
        'the finished line, whole',
      );

      if (end === 'Ctrl-C') terminal.interrupt();
      else expect(await curl('/exit')).toBe('staging');
      await untilScreen((rows) => terminal.exitStatus(rows) !== undefined, 'mirror to exit');
      // The app's exit code is mirror's; the app ends by the terminal's SIGINT on Ctrl-C.
      expect(terminal.exitStatus(screen)).toBe(end === 'Ctrl-C' ? 130 : 7);
      expect(appLinesIntact(screen)).toBe(true);
      const statusRows = screen.filter(isStatus);
      expect(statusRows).toHaveLength(1);
      const last = statusRows[0]!;
      // After all of the app's output, and the last row but mirror's exit code.
      expect(screen.indexOf(last)).toBeGreaterThan(screen.indexOf(FINISHED));
      expect(screen.indexOf(last)).toBe(screen.length - 2);
      expect(last).toContain(` · port ${PORT} mirrored · `);
      expect(last).toMatch(/ · \d+ connections · \d+(\.\d)? (B|kB) replayed · lag p50 /);
      expect(last).toContain(' · nothing dropped');
    },
  );

  test('kill -9 of mirror on a terminal ends the app and a process it detached', async () => {
    // The app's output goes through mirror there: what the app leaves behind must not survive
    // the end of those pipes, nor the guard die of writing to them (see layer/guard.c).
    const daemon = `${dir.path}/detached-daemon`;
    const app = join(dir.path, 'detaching.js');
    writeFileSync(
      app,
      `require('child_process').spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)', ${JSON.stringify(daemon)}], { detached: true, stdio: 'inherit' });
       require('http').createServer((q, r) => r.end('local')).listen(${PORT}, () => console.log('app: listening'));`,
    );
    const command = [process.execPath, CLI, 'mirror', '--netns', sandbox.target, '--'];
    const terminal = new Terminal(80, [...command, process.execPath, app], dir.path);
    terminals.push(terminal);
    try {
      await until(
        () => terminal.rows().includes(`mirrord: the app listens on ${PORT}: mirroring it`),
        'the app to listen',
      );
      await until(() => processesMatching(daemon).length === 1, 'the detached process');
      const [mirror] = processesMatching(command.join(' ')).filter((pid) =>
        commandLine(Number(pid))?.startsWith(process.execPath),
      );
      process.kill(Number(mirror), 'SIGKILL');
      await until(() => terminal.exitStatus() === 137, 'mirror to be killed');
      // The app's own process: tmux's and the shell's command lines name the app too.
      const running = (): string[] =>
        [...processesMatching(daemon), ...processesMatching(`${process.execPath} ${app}`)].filter(
          (pid) => commandLine(Number(pid))?.startsWith(process.execPath),
        );
      await until(
        () => running().length === 0,
        'the app and the process it detached to end',
        15_000,
      );
    } finally {
      killMatching(daemon);
    }
  });

  test('connections open before mirroring are told once, with their count', async () => {
    // Two keep-alive connections to staging, open before mirroring begins.
    const old = [stdinClient(sandbox, PORT), stdinClient(sandbox, PORT)];
    clients.push(...old);
    const established = (): number =>
      sandbox
        .run(sandbox.target, 'ss', ['-Htn', 'state', 'established', `sport = :${PORT}`])
        .split('\n')
        .filter(Boolean).length;
    await until(() => established() === 2, 'the two connections');
    const log = join(dir.path, 'app.log');
    const app = join(dir.path, 'app.js');
    writeFileSync(app, APP);
    const run = mirrorInto(sandbox.target, [process.execPath, app, String(PORT), log]);
    runs.push(run);
    await untilWhileRunning(
      run,
      () => run.output().includes(`the app listens on ${PORT}`),
      'the app to listen',
    );
    await untilReplayed(log, '/warmup');
    for (const client of old) client.stdin!.write(`GET /old HTTP/1.1\r\nHost: staging\r\n\r\n`);
    const counters = () => run.events().filter((e) => e.event === 'counters');
    await untilWhileRunning(run, () => run.output().includes(midStreamNotice(2)), 'the notice');
    // It is not repeated with the status: three more counters, new traffic, no second notice.
    const seen = counters().length;
    expect(await curl('/after')).toBe('staging');
    await untilWhileRunning(run, () => counters().length >= seen + 3, 'three more counters');
    expect(run.output().split(' open connections skipped: ')).toHaveLength(2);
    expect(counters().at(-1)).toMatchObject({ skippedMidStream: 2 });
    expect(await curl('/exit')).toBe('staging');
    expect(await run.exited).toBe(7);
  });

  test('piped, the app’s output passes through byte for byte, as it comes', async () => {
    const everyByte = Buffer.from([...Array(256).keys()]);
    const app = join(dir.path, 'bytes.js');
    writeFileSync(
      app,
      `process.stdout.write('app: out line\\n');
       process.stderr.write('app: err line\\n');
       require('http').createServer((req, res) => {
         req.resume();
         req.on('end', () => {
           res.end('local');
           process.stdout.write(Buffer.from(${JSON.stringify([...everyByte])}));
           process.stdout.write('no newline at the end');
           process.stderr.write('err: unfinished');
           setTimeout(() => process.exit(5), 20);
         });
       }).listen(${PORT}, () => process.stdout.write('app: listening\\n'));`,
    );
    const run = mirrord(['--netns', sandbox.target, '--', process.execPath, app]);
    runs.push(run);
    const stdout: Buffer[] = [];
    run.child.stdout!.on('data', (chunk: Buffer) => stdout.push(chunk));
    // Line by line as the app writes them, not when it exits.
    await untilWhileRunning(
      run,
      () => run.stdout().includes('app: listening\n'),
      'the app to listen',
    );
    expect(run.stdout()).toBe('app: out line\napp: listening\n');
    // Said once the agent copies the port: the next request is replayed, and ends the app.
    await untilWhileRunning(
      run,
      () => run.output().includes(`the app listens on ${PORT}: mirroring it`),
      'mirroring',
    );
    expect(await curl('/')).toBe('staging');
    expect(await run.exited).toBe(5);
    expect(Buffer.concat(stdout)).toEqual(
      Buffer.concat([
        Buffer.from('app: out line\napp: listening\n'),
        everyByte,
        Buffer.from('no newline at the end'),
      ]),
    );
    expect(run.output()).toContain('app: err line\n');
    expect(run.output()).toContain('err: unfinished');
  });
});

/**
 * `mirrord session`, the mode an editor's debugger uses: the real CLI places the agent on a
 * sandbox target and prints the environment to join with; a real Node server started by the
 * test with it gets the target's connections; the session ends when that process exits, or when
 * the pipe of its stdin closes, and leaves no agent. Its errors are JSON lines too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import {
  CLI,
  FIXTURES,
  LAYER,
  agentsOf,
  killRun,
  logLines,
  mirrord,
  tempDir,
  until,
  untilMirroring,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { runToEnd } from './support/processes.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const PORT = 8080;
const SERVER = join(FIXTURES, 'http-log-server.mjs');

describe('mirrord session', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];
  const apps: ChildProcess[] = [];

  beforeEach(() => {
    sandbox = createSandbox('session');
    dir = tempDir('session');
    sandbox.spawn(sandbox.target, process.execPath, [
      SERVER,
      String(PORT),
      join(dir.path, 'target.log'),
    ]);
  });

  afterEach(async () => {
    for (const app of apps.splice(0)) app.kill('SIGKILL');
    for (const run of runs.splice(0)) await killRun(run);
    sandbox.destroy();
    dir.remove();
  });

  function session(stdin: 'ignore' | 'pipe' = 'ignore'): MirrorRun {
    const run = mirrord(['--netns', sandbox.target], { command: 'session', stdin, cwd: dir.path });
    runs.push(run);
    return run;
  }

  /** The variables of the join line, once it came. */
  async function joinEnvironment(run: MirrorRun): Promise<Record<string, string>> {
    const line = () => run.events().find((e) => e.event === 'join');
    await untilWhileRunning(run, () => line() !== undefined, 'the join line');
    return line()!.env as Record<string, string>;
  }

  /** The test's own app, started as a debugger would: with the join line's variables. */
  function startJoined(env: Record<string, string>, log: string): ChildProcess {
    const app = spawn(process.execPath, [SERVER, String(PORT), log], {
      env: { ...process.env, ...env },
      stdio: 'ignore',
    });
    apps.push(app);
    return app;
  }

  test('a process started with the join line gets the mirrored connections; its exit ends the session', async () => {
    const run = session();
    const env = await joinEnvironment(run);
    expect(env.LD_PRELOAD?.split(':')[0]).toBe(LAYER);
    expect(existsSync(env.MIRRORD_LAYER_SOCKET!)).toBe(true);
    expect(env.MIRRORD_LAYER_TOKEN).toMatch(/^[0-9a-f]{32}$/);
    // An editor's debugger speaks to its debuggee over loopback: localhost stays local.
    expect(env.MIRRORD_OUTGOING_LOCALHOST).toBe('local');

    const log = join(dir.path, 'app.log');
    const app = startJoined(env, log);
    await untilMirroring(run, sandbox, PORT);
    await sandbox.runAsync(sandbox.client, 'curl', [
      '-sf',
      `http://${sandbox.targetAddress}:${PORT}/joined`,
    ]);
    // The app's accept() gave the original client, as for an app mirror starts.
    await until(
      () =>
        logLines(log).some(
          (line) => line.includes(`${sandbox.clientAddress}:`) && line.includes('GET /joined'),
        ),
      'the request to reach the joined app',
    );

    app.kill('SIGTERM');
    expect(await run.exited).toBe(0);
    expect(run.output()).toMatch(
      new RegExp(`the processes that joined the session exited \\(pid ${app.pid}\\)`),
    );
    expect(agentsOf(sandbox.target)).toEqual([]);
    expect(existsSync(env.MIRRORD_LAYER_SOCKET!)).toBe(false);
  });

  test('closing the pipe of its stdin ends the session, as an editor that is gone does', async () => {
    const run = session('pipe');
    const env = await joinEnvironment(run);
    startJoined(env, join(dir.path, 'app.log'));
    await untilMirroring(run, sandbox, PORT);
    run.child.stdin!.end();
    // Ended as interrupted, the app the CLI did not start left running.
    expect(await run.exited).toBe(130);
    expect(agentsOf(sandbox.target)).toEqual([]);
    expect(existsSync(env.MIRRORD_LAYER_SOCKET!)).toBe(false);
  });

  test('an error is one JSON line on stdout and one line on stderr, with a non-zero exit, also with stdin held open', async () => {
    const missing = `${sandbox.target}-missing`;
    // As the editor runs it: a pipe on stdin that stays open.
    const run = mirrord(['--netns', missing], { command: 'session', stdin: 'pipe' });
    runs.push(run);
    await until(() => run.child.exitCode !== null, 'the CLI to exit after its error');
    expect(run.child.exitCode).not.toBe(0);
    const lines = run.stdout().trim().split('\n');
    expect(lines).toHaveLength(1);
    const event = JSON.parse(lines[0]!) as { event: string; message: string };
    expect(event.event).toBe('error');
    expect(event.message).toContain(`"${missing}"`);
    // stderr: the same line for the person; nothing else on either.
    expect(run.output().trim().split('\n').sort()).toEqual(
      [lines[0], `mirrord: ${event.message}`].sort(),
    );
  });

  test('ls --local lists the network namespaces, the targets of --netns', async () => {
    const result = await runToEnd(process.execPath, [CLI, 'ls', '--local', '--json'], process.env);
    expect(result.code).toBe(0);
    const { targets } = JSON.parse(result.stdout) as { targets: { target: string }[] };
    expect(targets).toContainEqual({
      target: `netns/${sandbox.target}`,
      kind: 'netns',
      name: sandbox.target,
    });
  });
});

/**
 * The local app's life under `mirrord mirror`, with the real CLI and real apps: nothing the app
 * started outlives a CLI killed with SIGKILL, and the ends a user sees (an app that exits at
 * once, an app that ignores SIGTERM) are said.
 */
import net from 'node:net';
import { join } from 'node:path';
import {
  FIXTURES,
  agentsOf,
  killMatching,
  killRun,
  mirrord,
  tempDir,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { descendants, killAll, stillRunning } from './support/processes.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

/** Below the ephemeral range, so that no outgoing connection holds it. */
const randomPort = (): number => 20_000 + Math.floor(Math.random() * 10_000);

/** Debian's python3, which has gunicorn (python3-gunicorn); not the pyenv shim. */
const PYTHON = '/usr/bin/python3';

/** Whether this process can listen on 127.0.0.1:port, i.e. nothing holds it. */
function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

describe('the local app’s life', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];
  /** Processes a test saw, killed after it should it fail. */
  const seen = new Map<number, string>();

  beforeEach(() => {
    sandbox = createSandbox('life');
    dir = tempDir('life');
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    killAll(seen);
    seen.clear();
    killMatching(dir.path);
    sandbox.destroy();
    dir.remove();
  });

  /** `mirror --netns TARGET --json -- COMMAND`, remembered for clean-up. */
  function mirrorApp(command: string[]): MirrorRun {
    const run = mirrord(['--netns', sandbox.target, '--json', '--', ...command]);
    runs.push(run);
    return run;
  }

  /** Every process below the CLI now (its guard, the app and what the app started, its agent). */
  function processesOf(run: MirrorRun): Map<number, string> {
    const found = descendants(run.child.pid!);
    for (const [pid, command] of found) seen.set(pid, command);
    return found;
  }

  const listened = (run: MirrorRun, port: number) => () =>
    run.events().some((e) => e.event === 'listen' && e.port === port);

  test('kill -9 of mirror ends the app and a process it started without the layer', async () => {
    const [port, childPort] = [randomPort(), randomPort() + 10_000];
    // The child runs without LD_PRELOAD, as a static binary or a clean environment would.
    const app = `
const { spawn } = require('child_process');
const env = { ...process.env };
delete env.LD_PRELOAD;
spawn(process.execPath, ['-e', "require('http').createServer().listen(${childPort}, () => console.log('child listening'))"], { env, stdio: 'inherit' });
require('http').createServer((q, r) => r.end('local')).listen(${port}, () => console.log('app listening'));`;
    const run = mirrorApp([process.execPath, '-e', app]);
    await untilWhileRunning(
      run,
      () => listened(run, port)() && run.stdout().includes('child listening'),
      'the app and its child to listen',
    );
    const processes = processesOf(run);
    expect(
      [...processes.values()].filter((c) => c.startsWith(`${process.execPath} -e`)),
    ).toHaveLength(2);

    run.child.kill('SIGKILL');
    await run.exited;
    expect(await stillRunning(processes)).toEqual([]);
    expect({ port: await portFree(port), childPort: await portFree(childPort) }).toEqual({
      port: true,
      childPort: true,
    });
    expect(run.output()).toContain(`mirrord-guard: mirrord is gone: stopping ${process.execPath}`);
    expect(agentsOf(sandbox.target)).toEqual([]);
  });

  test('kill -9 of mirror ends a pre-fork server (gunicorn) and every worker', async () => {
    const port = randomPort();
    const run = mirrorApp([
      PYTHON,
      '-m',
      'gunicorn',
      '--workers',
      '3',
      '--bind',
      `0.0.0.0:${port}`,
      '--chdir',
      FIXTURES,
      '--env',
      `LOG_FILE=${join(dir.path, 'local.log')}`,
      'wsgi_log_app:app',
    ]);
    await untilWhileRunning(
      run,
      () => listened(run, port)() && run.output().split('Booting worker').length > 3,
      'gunicorn and its three workers',
    );
    const processes = processesOf(run);
    expect(
      [...processes.values()].filter((c) => c.startsWith(`${PYTHON} -m gunicorn`)),
    ).toHaveLength(4);

    run.child.kill('SIGKILL');
    await run.exited;
    expect(await stillRunning(processes)).toEqual([]);
    expect(await portFree(port)).toBe(true);
  });

  test('an app that exits at once: it is said that it never listened', async () => {
    const run = mirrord(['--netns', sandbox.target, '--', 'true']);
    runs.push(run);
    expect(await run.exited).toBe(0);
    expect(run.output()).toContain(
      'mirrord: true exited with code 0 and never listened on a port: nothing was mirrored',
    );
  });

  test('Ctrl-C with an app that ignores SIGTERM: what is waited for is said, then the app and its processes are killed', async () => {
    const port = randomPort();
    const stubborn = `process.on('SIGTERM', () => console.log(process.argv[1] + ' ignores SIGTERM'))`;
    const app = `
${stubborn};
require('child_process').spawn(process.execPath, ['-e', ${JSON.stringify(`${stubborn}; setInterval(() => {}, 1000)`)}, 'worker'], { stdio: 'inherit' });
require('http').createServer((q, r) => r.end('local')).listen(${port});`;
    const run = mirrorApp([process.execPath, '-e', app, 'app']);
    await untilWhileRunning(run, listened(run, port), 'the app to listen');
    const processes = processesOf(run);
    expect(
      [...processes.values()].filter((c) => c.startsWith(`${process.execPath} -e`)),
    ).toHaveLength(2);

    const interrupted = Date.now();
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(130);
    const took = Date.now() - interrupted;
    expect(took).toBeGreaterThanOrEqual(5000);
    expect(took).toBeLessThan(9000);
    const lines = run.output().split('\n');
    const waiting = lines.indexOf(
      `mirrord: waiting for ${process.execPath} to exit after SIGTERM (it is killed in 4 s)`,
    );
    const killed = lines.indexOf(
      `mirrord: ${process.execPath} did not exit within 5 s of SIGTERM: killed it and every process it started (SIGKILL)`,
    );
    expect({ waiting: waiting >= 0, killed: killed > waiting }).toEqual({
      waiting: true,
      killed: true,
    });
    expect(lines.indexOf('app ignores SIGTERM')).toBeLessThan(waiting);
    expect(run.output()).not.toContain('never listened');
    expect(await stillRunning(processes)).toEqual([]);
    expect(agentsOf(sandbox.target)).toEqual([]);
  });
});

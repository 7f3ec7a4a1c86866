/**
 * `mirrord mirror` as a user runs it: the real CLI, a target in a sandbox netns with real
 * clients, and a real local app under the layer.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { waitForTcp } from '../src/platform/local/netns.js';
import { agentsOf, listening, mirrord, until, type MirrorRun } from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const PORT = 37200 + Math.floor(Math.random() * 700);

/** Prints each request it gets, with the peer it sees; exits with 3 after `count` requests. */
const localApp = (port: number, count: number): string => `
let n = 0;
require('http').createServer((req, res) => {
  let body = '';
  req.on('data', (d) => (body += d));
  req.on('end', () => {
    console.log('got ' + req.method + ' ' + req.url + ' ' + body + ' from ' + req.socket.remoteAddress);
    res.end('local');
    if (++n === ${count}) setTimeout(() => process.exit(3), 50);
  });
}).listen(${port});`;

describe('mirrord mirror', () => {
  let sandbox: Sandbox;
  const runs: MirrorRun[] = [];
  const locals: ChildProcess[] = [];

  beforeEach(async () => {
    sandbox = createSandbox('mirror');
    sandbox.spawn(sandbox.target, process.execPath, [
      '-e',
      `require('http').createServer((q, r) => { q.resume(); q.on('end', () => r.end('staging')); }).listen(${PORT})`,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, PORT);
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) {
      run.child.kill('SIGKILL');
      await run.exited;
    }
    for (const local of locals.splice(0)) local.kill('SIGKILL');
    sandbox.destroy();
  });

  /** A service already running on this machine, not started by mirrord. */
  async function startLocalService(port: number): Promise<{ seen(): string }> {
    const local = spawn(process.execPath, ['-e', localApp(port, 100)], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    locals.push(local);
    let seen = '';
    local.stdout!.on('data', (chunk: Buffer) => (seen += chunk.toString()));
    await listening(port);
    return { seen: () => seen };
  }

  const curl = (path: string, body: string): Promise<string> =>
    sandbox.runAsync(sandbox.client, 'curl', [
      '-s',
      '--max-time',
      '5',
      '-d',
      body,
      `http://${sandbox.targetAddress}:${PORT}${path}`,
    ]);

  /**
   * Sends the request to the target until the local service logs `line`: the port is copied
   * only once the agent acknowledged its subscription, which may come just after the
   * "mirroring" line. Staging answers every one of them.
   */
  async function untilReplayed(
    local: { seen(): string },
    path: string,
    body: string,
    line: string,
  ): Promise<void> {
    const deadline = Date.now() + 30_000;
    for (;;) {
      expect(await curl(path, body)).toBe('staging');
      try {
        await until(() => local.seen().includes(line), 'the replayed request', 1_000);
        return;
      } catch (error) {
        if (Date.now() > deadline) throw error;
      }
    }
  }

  test('replays into the port COMMAND listens on; the app sees the original client; exit code is COMMAND’s', async () => {
    const run = mirrord([
      '--netns',
      sandbox.target,
      '--json',
      '--',
      process.execPath,
      '-e',
      localApp(PORT, 3),
    ]);
    runs.push(run);
    await until(() => run.output().includes(`the app listens on ${PORT}`), 'the app to listen');
    for (const i of [1, 2, 3]) expect(await curl(`/order/${i}`, `item=${i}`)).toBe('staging');
    expect(await run.exited).toBe(3);
    expect(agentsOf(sandbox.target)).toEqual([]);
    // --json: the session's events, one JSON object a line, among the app's own output.
    const events = run
      .output()
      .split('\n')
      .filter((line) => line.startsWith('{"event"'))
      .map((line) => JSON.parse(line) as { event: string; [key: string]: unknown });
    expect(events[0]).toMatchObject({ event: 'ready', target: `netns ${sandbox.target}` });
    expect(events).toContainEqual({ event: 'listen', port: PORT, localPort: PORT });
    const opened = events.filter((e) => e.event === 'opened');
    expect(opened).toHaveLength(3);
    expect(opened[0]).toMatchObject({
      client: { address: sandbox.clientAddress },
      server: { port: PORT },
    });
    const closed = events.filter((e) => e.event === 'closed');
    expect(closed.map((e) => e.reason)).toEqual(['fin', 'fin', 'fin']);
    const totals = events.at(-1)!;
    expect(totals).toMatchObject({
      event: 'counters',
      target: `netns ${sandbox.target}`,
      replayed: 3,
      completed: 3,
      bytesDropped: 0,
    });
    // Lag: the tap's stamp to the hand-over to the app, on the agent's clock mapped onto ours.
    expect(totals.lagP50Ms).toBeGreaterThan(0);
    expect(totals.lagP99Ms).toBeGreaterThanOrEqual(totals.lagP50Ms as number);
    for (const i of [1, 2, 3]) {
      expect(run.output()).toContain(
        `got POST /order/${i} item=${i} from ::ffff:${sandbox.clientAddress}`,
      );
    }
  });

  test('--port REMOTE:LOCAL replays into a service already running, until Ctrl-C', async () => {
    const localPort = PORT + 1000;
    const local = await startLocalService(localPort);
    const run = mirrord(['--netns', sandbox.target, '--port', `${PORT}:${localPort}`]);
    runs.push(run);
    await until(() => run.output().includes('mirroring'), 'the session');
    await untilReplayed(local, '/mapped', 'x=1', 'got POST /mapped x=1 from ::ffff:127.0.0.2');
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(130);
    expect(agentsOf(sandbox.target)).toEqual([]);
    // Not a terminal: no live status, one line of totals at the end.
    expect(run.output()).toMatch(
      new RegExp(
        `mirrord: netns ${sandbox.target} · port ${PORT} mirrored · 1 connection · ` +
          `[0-9.]+ (B|kB) replayed · lag p50 [0-9.]+ ms, p99 [0-9.]+ ms · `,
      ),
    );
  });

  test('--ignore-port leaves a port out, --port maps a remote port onto another local one', async () => {
    const [ignored, mapped, appPort] = [PORT, PORT + 5, PORT + 7];
    sandbox.spawn(sandbox.target, process.execPath, [
      '-e',
      `require('http').createServer((q, r) => { q.resume(); q.on('end', () => r.end('staging')); }).listen(${mapped})`,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, mapped);
    const app = `
for (const port of [${ignored}, ${appPort}]) {
  require('http').createServer((req, res) => {
    req.resume();
    req.on('end', () => { console.log('app ' + port + ' got ' + req.url); res.end('local'); });
  }).listen(port);
}`;
    const run = mirrord([
      '--netns',
      sandbox.target,
      '--ignore-port',
      String(ignored),
      '--port',
      `${mapped}:${appPort}`,
      '--json',
      '--',
      process.execPath,
      '-e',
      app,
    ]);
    runs.push(run);
    await until(() => run.output().includes(`"localPort":${appPort}`), 'the app to listen');
    expect(await curl('/to-the-ignored-port', 'a=1')).toBe('staging');
    const toMapped = await sandbox.runAsync(sandbox.client, 'curl', [
      '-s',
      '--max-time',
      '5',
      `http://${sandbox.targetAddress}:${mapped}/to-the-mapped-port`,
    ]);
    expect(toMapped).toBe('staging');
    await until(
      () => run.output().includes(`app ${appPort} got /to-the-mapped-port`),
      'the mapped request',
    );
    run.child.kill('SIGINT');
    await run.exited;
    expect(run.output()).not.toContain('/to-the-ignored-port');
    const listens = run
      .output()
      .split('\n')
      .filter((line) => line.startsWith('{"event":"listen"'))
      .map((line) => (JSON.parse(line) as { port: number }).port);
    expect(listens).not.toContain(ignored);
    expect(agentsOf(sandbox.target)).toEqual([]);
  });

  test('mirrord.json in the working directory holds the settings', async () => {
    const localPort = PORT + 2000;
    const local = await startLocalService(localPort);
    const dir = mkdtempSync(join(tmpdir(), 'mirrord-config-'));
    try {
      writeFileSync(
        join(dir, 'mirrord.json'),
        JSON.stringify({
          netns: sandbox.target,
          ports: [`${PORT}:${localPort}`],
          midStream: false,
        }),
      );
      const run = mirrord([], { cwd: dir });
      runs.push(run);
      await until(() => run.output().includes('mirroring'), 'the session');
      await untilReplayed(local, '/configured', 'y=2', 'got POST /configured y=2');
      run.child.kill('SIGINT');
      expect(await run.exited).toBe(130);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('bad input gives one line and a non-zero exit, with nothing left running', async () => {
    const configDir = mkdtempSync(join(tmpdir(), 'mirrord-config-'));
    const badConfig = join(configDir, 'mirrord.json');
    writeFileSync(badConfig, JSON.stringify({ netns: sandbox.target, prots: ['80'] }));
    const cases: [string[], RegExp][] = [
      [
        ['--config', badConfig, '--', 'true'],
        /unknown key "prots" \(known: pid, netns, ports, ignorePorts, midStream, env, envIncludes, envExcludes, envOverrides, fs, fsLocals, fsRemotes, outgoing, outgoingLocals, localhost\)/,
      ],
      [['--config', join(configDir, 'missing.json'), '--', 'true'], /no such file/],
      [['--netns', sandbox.target], /nothing to mirror into/],
      [
        ['--netns', 'no-such-netns', '--port', '80'],
        /network namespace "no-such-netns" does not exist/,
      ],
      [
        ['--netns', sandbox.target, '--port', '80:99999'],
        /--port "80:99999" is not REMOTE\[:LOCAL\]/,
      ],
      [
        ['--netns', sandbox.target, '--', 'no-such-command-xyz'],
        /command not found: no-such-command-xyz/,
      ],
    ];
    for (const [args, message] of cases) {
      const run = mirrord(args);
      runs.push(run);
      expect(await run.exited).not.toBe(0);
      const lines = run
        .output()
        .trim()
        .split('\n')
        .filter((line) => !line.startsWith('mirrord: mirroring'));
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(message);
      expect(agentsOf(sandbox.target)).toEqual([]);
    }
    rmSync(configDir, { recursive: true, force: true });
  });
});

/**
 * `mirrord mirror` into pre-fork servers, where the process that listens is not the one that
 * reads the client's address: Node's cluster (the primary accepts and hands each socket to a
 * worker) and gunicorn (workers forked after listen() accept on the listener they inherited).
 * Each runs as the target (in a sandbox netns, with real clients) and as the local app (under
 * the layer); under load, every request the local workers log must carry the client's own
 * address and port, as the target's did, and the requests must be spread over several workers.
 */
import { join } from 'node:path';
import { waitForTcp } from '../src/platform/local/netns.js';
import { expectAccounted, untilAtRest } from './support/accounting.js';
import {
  FIXTURES,
  agentsOf,
  byConnection,
  killMatching,
  killRun,
  logLines,
  mirrorInto,
  sortedRecord,
  tempDir,
  until,
  untilMirroring,
  type MirrorRun,
} from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

/** Below the ephemeral range, so that no outgoing connection holds it. */
const randomPort = (): number => 20_000 + Math.floor(Math.random() * 10_000);

/** Debian's python3, which has gunicorn (python3-gunicorn); not the pyenv shim. */
const PYTHON = '/usr/bin/python3';
const WORKERS = 4;

/** What http_keepalive_client.py prints. */
interface ClientReport {
  requests: number;
  connections: number[];
  wrong: string[];
}

describe('mirrord mirror into pre-fork servers', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];

  beforeEach(() => {
    sandbox = createSandbox('prefork');
    dir = tempDir('prefork');
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    // A local app left by a killed mirror: found by its log file in its arguments.
    killMatching(dir.path);
    sandbox.destroy();
    dir.remove();
  });

  /**
   * Load from the client netns: `connections` keep-alive connections of `requests` requests
   * each (a server that closes after each answer gets a new connection per request), all with
   * checked answers. Several clients at once.
   */
  async function load(port: number, clients: [number, number][]): Promise<number> {
    const reports = await Promise.all(
      clients.map(([connections, requests], seed) =>
        sandbox.runAsync(sandbox.client, PYTHON, [
          join(FIXTURES, 'http_keepalive_client.py'),
          sandbox.targetAddress,
          String(port),
          String(connections),
          String(requests),
          String(seed + 1),
        ]),
      ),
    );
    let total = 0;
    for (const report of reports.map((r) => JSON.parse(r) as ClientReport)) {
      expect(report.wrong).toEqual([]);
      total += report.requests;
    }
    return total;
  }

  /**
   * Both logs hold `CLIENT:PORT METHOD PATH DIGEST WORKER_PID` lines: the local app must have
   * seen every connection with its original client and on each the same requests, whichever
   * worker served them. Returns the local workers that served requests.
   */
  async function expectSameRequests(targetLog: string, localLog: string, requests: number) {
    await until(() => logLines(targetLog).length >= requests, `${requests} requests at the target`);
    await until(
      () => logLines(localLog).length >= requests,
      `${requests} requests in the local app (it has ${logLines(localLog).length})`,
      60_000,
    );
    const withoutWorker = (lines: string[]) => lines.map((line) => line.replace(/ \d+$/, ''));
    const target = byConnection(withoutWorker(logLines(targetLog)));
    const local = byConnection(withoutWorker(logLines(localLog)));
    expect(sortedRecord(local)).toEqual(sortedRecord(target));
    expect(target.size).toBeGreaterThan(0);
    return new Set(logLines(localLog).map((line) => line.split(' ').at(-1)));
  }

  /**
   * Ends the session as a user does (Ctrl-C) once nothing is in flight, and checks that no
   * agent is left and that every byte copied is accounted for, nothing dropped.
   */
  async function interrupt(run: MirrorRun): Promise<void> {
    await untilAtRest(run);
    run.child.kill('SIGINT');
    expect(await run.exited).toBe(130);
    expect(agentsOf(sandbox.target)).toEqual([]);
    expect(expectAccounted(run.events(), { atRest: true })).toMatchObject({ bytesDropped: 0 });
  }

  test('Node cluster: its workers log every request with the original client', async () => {
    const port = randomPort();
    const server = join(FIXTURES, 'http-log-cluster.mjs');
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    sandbox.spawn(sandbox.target, process.execPath, [server, String(port), '4', targetLog]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, [
      process.execPath,
      server,
      String(port),
      String(WORKERS),
      localLog,
    ]);
    runs.push(run);
    await until(
      () => run.stdout().split(' listening').length > WORKERS,
      `${WORKERS} local workers`,
    );
    await untilMirroring(run, sandbox, port);

    // Long keep-alive connections, and many short ones opened at once.
    const requests = await load(port, [
      [16, 25],
      [64, 1],
    ]);
    expect(requests).toBe(464);
    const workers = await expectSameRequests(targetLog, localLog, requests);
    for (const connection of byConnection(logLines(localLog)).keys()) {
      expect(connection).toMatch(new RegExp(`^::ffff:${sandbox.clientAddress}:\\d+$`));
    }
    expect(workers.size).toBeGreaterThan(1);
    await interrupt(run);
  });

  test('gunicorn: its sync workers, forked after listen(), log every request with the original client', async () => {
    const port = randomPort();
    const gunicorn = (log: string): string[] => [
      '-m',
      'gunicorn',
      '--workers',
      String(WORKERS),
      '--bind',
      `0.0.0.0:${port}`,
      '--chdir',
      FIXTURES,
      '--env',
      `LOG_FILE=${log}`,
      'wsgi_log_app:app',
    ];
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    sandbox.spawn(sandbox.target, PYTHON, gunicorn(targetLog));
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, [PYTHON, ...gunicorn(localLog)]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);

    // Sync workers close after each answer: every request is a connection a worker accepts.
    const requests = await load(port, [
      [8, 30],
      [32, 1],
    ]);
    expect(requests).toBe(272);
    const workers = await expectSameRequests(targetLog, localLog, requests);
    for (const connection of byConnection(logLines(localLog)).keys()) {
      expect(connection).toMatch(new RegExp(`^${sandbox.clientAddress}:\\d+$`));
    }
    expect(workers.size).toBeGreaterThan(1);
    await interrupt(run);
  });
});

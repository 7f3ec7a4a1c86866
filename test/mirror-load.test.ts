/**
 * `mirrord mirror` under load and under failure, with the real CLI, a target in a sandbox netns,
 * real clients and a real local app: many connections at once, one large upload, and apps that
 * die in the middle of a session.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { join } from 'node:path';
import { isStale, waitForTcp } from '../src/platform/local/netns.js';
import { expectAccounted, untilAtRest } from './support/accounting.js';
import {
  FIXTURES,
  agentsOf,
  connectionsOn,
  killMatching,
  killRun,
  logLines,
  mirrorInto,
  netnsList,
  processesMatching,
  tempDir,
  untilCountOrStuck,
  untilMirroring,
  untilWhileRunning,
  type MirrorRun,
} from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

/** Below the ephemeral range, so that no outgoing connection holds it. */
const randomPort = (): number => 20_000 + Math.floor(Math.random() * 10_000);

/** Enough open files for a thousand connections in every process on the way. */
const NOFILE = 8192;
const DIGEST_SERVER = join(FIXTURES, 'digest-server.mjs');
const PREFORK_SERVER = join(FIXTURES, 'prefork-http-server.mjs');

/** What digest-clients.mjs reports for one connection. */
interface ClientConnection {
  port: number;
  bytes: number;
  sha: string;
  answer: string;
  error?: string;
}

describe('mirrord mirror under load and failure', () => {
  let sandbox: Sandbox;
  let dir: ReturnType<typeof tempDir>;
  const runs: MirrorRun[] = [];

  beforeEach(() => {
    sandbox = createSandbox('load');
    dir = tempDir('load');
  });

  afterEach(async () => {
    for (const run of runs.splice(0)) await killRun(run);
    // A local app whose mirror was killed: found by its log directory in its arguments.
    killMatching(dir.path);
    sandbox.destroy();
    dir.remove();
  });

  /** A digest-server.mjs in the target netns on these ports. */
  async function startTarget(ports: number[]): Promise<void> {
    sandbox.spawn(sandbox.target, 'prlimit', [
      `--nofile=${NOFILE}:${NOFILE}`,
      '--',
      process.execPath,
      DIGEST_SERVER,
      ...ports.flatMap((port) => ['--port', String(port)]),
      '--log',
      join(dir.path, 'target.log'),
    ]);
    for (const port of ports) await waitForTcp(sandbox.client, sandbox.targetAddress, port);
  }

  /** digest-clients.mjs in the client netns: COUNT connections at once. */
  async function clients(
    port: number,
    count: number,
    bytes: [number, number],
    pacing: [number, number] = [1, 0],
  ): Promise<ClientConnection[]> {
    const stdout = await sandbox.runAsync(sandbox.client, 'prlimit', [
      `--nofile=${NOFILE}:${NOFILE}`,
      '--',
      process.execPath,
      join(FIXTURES, 'digest-clients.mjs'),
      sandbox.targetAddress,
      String(port),
      String(count),
      ...[...bytes, ...pacing].map(String),
    ]);
    return (JSON.parse(stdout) as { connections: ClientConnection[] }).connections;
  }

  /** Connections whose answer from the target is not the digest of what they sent. */
  const wronglyAnswered = (connections: ClientConnection[]): ClientConnection[] =>
    connections.filter((c) => c.error !== undefined || c.answer !== c.sha);

  /**
   * What the local app logged (digest-server lines) against what the clients sent: one line per
   * connection, under the original client's address and port, with the same size and digest.
   * The differences (the first few, and how many), and which peers the app saw how often.
   */
  function mirrorDifferences(
    logFile: string,
    sent: ClientConnection[],
  ): { differences: string[]; peers: Record<string, number>; streamsNotReceived: number } {
    const seen = new Map<number, string>();
    const peers: Record<string, number> = {};
    const digests = new Set<string>();
    for (const line of logLines(logFile)) {
      const [address = '', port, , bytes, sha = ''] = line.split(' ');
      if (bytes === '0') continue; // an empty probe connection (untilMirroring)
      peers[address] = (peers[address] ?? 0) + 1;
      seen.set(Number(port), `${bytes} ${sha}`);
      digests.add(sha);
    }
    const differences: string[] = [];
    for (const connection of sent) {
      const got = seen.get(connection.port);
      if (got !== `${connection.bytes} ${connection.sha}`) {
        differences.push(
          `client port ${connection.port}: sent ${connection.bytes}, app got ${got}`,
        );
      }
    }
    if (differences.length > 10) {
      differences.splice(10, Infinity, `… ${differences.length} differences in all`);
    }
    // Apart from the peer it was reported under: streams whose bytes never arrived whole.
    const streamsNotReceived = sent.filter((c) => !digests.has(c.sha)).length;
    return { differences, peers, streamsNotReceived };
  }

  const linesWithBytes = (logFile: string): number =>
    logLines(logFile).filter((line) => line.split(' ')[3] !== '0').length;

  /** How the run's connections to `port` ended, counted by reason. */
  function closedReasons(run: MirrorRun, port: number): Record<string, number> {
    const reasons: Record<string, number> = {};
    for (const { reason } of connectionsOn(run, port).closed) {
      reasons[reason as string] = (reasons[reason as string] ?? 0) + 1;
    }
    return reasons;
  }

  /** A prefork-http-server.mjs (two workers) in the target netns, logging to `log`. */
  async function startPreforkTarget(port: number, log: string): Promise<void> {
    sandbox.spawn(sandbox.target, 'prlimit', [
      `--nofile=${NOFILE}:${NOFILE}`,
      '--',
      process.execPath,
      PREFORK_SERVER,
      '--port',
      String(port),
      '--log',
      log,
    ]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
  }

  /**
   * What a prefork-http-server.mjs log says was served: connections that carried requests (a
   * line each, written when the connection closed), requests, and request bytes read.
   */
  function served(log: string): { connections: number; requests: number; bytes: number } {
    const lines = logLines(log)
      .map((line) => line.split(' ').map(Number))
      .filter(([, , requests]) => requests! > 0);
    return {
      connections: lines.length,
      requests: lines.reduce((n, [, , requests]) => n + requests!, 0),
      bytes: lines.reduce((n, [, , , bytes]) => n + bytes!, 0),
    };
  }

  /**
   * Nothing of the session is left: no agent, no app process, and no netns made since
   * `netnsBefore` whose maker is gone (other test files may be making their own meanwhile).
   */
  function expectNothingLeft(netnsBefore: string[], appMarker: string): void {
    expect(agentsOf(sandbox.target)).toEqual([]);
    expect(processesMatching(appMarker)).toEqual([]);
    expect(netnsList().filter((name) => !netnsBefore.includes(name) && isStale(name))).toEqual([]);
  }

  test('1,000 concurrent connections, each mirrored exactly under its original client port', async () => {
    const port = randomPort();
    const localLog = join(dir.path, 'local.log');
    await startTarget([port]);
    const run = mirrorInto(
      sandbox.target,
      [process.execPath, DIGEST_SERVER, '--port', String(port), '--log', localLog],
      { nofile: NOFILE },
    );
    runs.push(run);
    await untilMirroring(run, sandbox, port);
    const probes = connectionsOn(run, port).opened.length;

    // All 1,000 are opened at once and stay open together while each sends its payload in
    // eight pieces, a quarter of a second apart (about 17 MB/s in all).
    const sent = await clients(port, 1000, [4 * 1024, 64 * 1024], [8, 250]);
    expect(sent).toHaveLength(1000);
    expect(new Set(sent.map((c) => c.port)).size).toBe(1000);
    expect(wronglyAnswered(sent)).toEqual([]);

    await untilCountOrStuck(() => connectionsOn(run, port).closed.length, probes + 1000);
    await untilCountOrStuck(() => linesWithBytes(localLog), 1000);
    expect({
      closed: closedReasons(run, port),
      ...mirrorDifferences(localLog, sent),
    }).toEqual({
      closed: { fin: probes + 1000 },
      differences: [],
      peers: { [`::ffff:${sandbox.clientAddress}`]: 1000 },
      streamsNotReceived: 0,
    });
    await untilAtRest(run);
    run.child.kill('SIGINT');
    await run.exited;
    expect(expectAccounted(run.events(), { atRest: true })).toMatchObject({ bytesDropped: 0 });
    expect(agentsOf(sandbox.target)).toEqual([]);
  });

  // A reset, not a FIN, is how load generators end their connections, and an app seconds behind
  // still has the last requests of a connection unread when the reset comes. Replayed at once,
  // the reset discarded them: in our socket, and in the app's, which a server closes on the
  // failed answer. The session said "rst, nothing dropped".
  test('a pre-fork app seconds behind gets every request of connections their clients reset', async () => {
    const port = randomPort();
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    await startPreforkTarget(port, targetLog);
    // Each worker of the app is busy for 2 s at its first request: it reads its connections
    // long after their clients reset them.
    const run = mirrorInto(
      sandbox.target,
      [
        ...[process.execPath, PREFORK_SERVER, '--port', String(port), '--log', localLog],
        ...['--stall-first-ms', '2000'],
      ],
      { nofile: NOFILE },
    );
    runs.push(run);
    await untilMirroring(run, sandbox, port);
    const probes = connectionsOn(run, port).opened.length;

    // 8 connections of 3,000 pipelined requests (130 kB each, twice what an app's socket takes
    // unread), each reset once the target answered them all.
    const clients = JSON.parse(
      await sandbox.runAsync(sandbox.client, process.execPath, [
        join(FIXTURES, 'pipelined-reset-clients.mjs'),
        sandbox.targetAddress,
        String(port),
        '8',
        '3000',
      ]),
    ) as { answered: number; bytesSent: number; ports: number[] };
    expect(clients.answered).toBe(8 * 3000);
    await untilCountOrStuck(() => served(targetLog).connections, 8);
    expect(served(targetLog)).toEqual({
      connections: 8,
      requests: 8 * 3000,
      bytes: clients.bytesSent,
    });
    await untilCountOrStuck(() => connectionsOn(run, port).closed.length, probes + 8);
    await untilCountOrStuck(() => served(localLog).connections, 8);
    // What the app served is what the target served, and the session says so.
    expect({
      app: served(localLog),
      closed: closedReasons(run, port),
    }).toEqual({
      app: served(targetLog),
      closed: { fin: probes, rst: 8 },
    });
    await untilAtRest(run);
    run.child.kill('SIGINT');
    await run.exited;
    expect(expectAccounted(run.events(), { atRest: true })).toMatchObject({
      bytesReplayed: clients.bytesSent,
      bytesDropped: 0,
    });
  });

  // The load: a load generator at the target's full speed over 256 keep-alive
  // connections for 5 s, a pre-fork server as target and as local app.
  test('under full load from wrk, a pre-fork app gets what the target served, or the session reports the difference', async () => {
    const port = randomPort();
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    await startPreforkTarget(port, targetLog);
    const run = mirrorInto(
      sandbox.target,
      [process.execPath, PREFORK_SERVER, '--port', String(port), '--log', localLog],
      { nofile: NOFILE },
    );
    runs.push(run);
    await untilMirroring(run, sandbox, port);
    const wrk = await sandbox.runAsync(sandbox.client, 'wrk', [
      ...['-t', '2', '-c', '256', '-d', '5s'],
      `http://${sandbox.targetAddress}:${port}/`,
    ]);
    expect(wrk).toMatch(/\d+ requests in/);
    await untilCountOrStuck(() => served(targetLog).connections, 256);
    const target = served(targetLog);
    expect(target.connections).toBe(256);
    await untilCountOrStuck(() => served(localLog).connections, 256);
    await untilAtRest(run);
    run.child.kill('SIGINT');
    await run.exited;
    const totals = expectAccounted(run.events(), { atRest: true });
    const app = served(localLog);
    // Every byte the target read was mirrored; what the app did not get is counted as dropped,
    // and where nothing was, the app served every request the target served.
    expect({
      mirrored: totals.bytesMirrored,
      dropped: totals.bytesDroppedKernel + totals.bytesDroppedAgent,
      appGotOrDropped: app.bytes + totals.bytesDropped >= target.bytes,
      appGotReplayed: app.bytes >= totals.bytesReplayed,
    }).toEqual({ mirrored: target.bytes, dropped: 0, appGotOrDropped: true, appGotReplayed: true });
    if (totals.bytesDropped === 0) expect(app).toEqual(target);
  });

  test('a 200 MB upload (curl) is mirrored exactly', async () => {
    const port = randomPort();
    const server = join(FIXTURES, 'http-log-server.mjs');
    const targetLog = join(dir.path, 'target.log');
    const localLog = join(dir.path, 'local.log');
    const upload = join(dir.path, 'upload.bin');
    execFileSync('bash', ['-c', `head -c ${200 * 1024 * 1024} /dev/urandom > ${upload}`]);
    const digest = createHash('sha256');
    for await (const chunk of createReadStream(upload)) digest.update(chunk as Buffer);
    const sha = digest.digest('hex');

    sandbox.spawn(sandbox.target, process.execPath, [server, String(port), targetLog]);
    await waitForTcp(sandbox.client, sandbox.targetAddress, port);
    const run = mirrorInto(sandbox.target, [process.execPath, server, String(port), localLog]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);
    const probes = connectionsOn(run, port).opened.length;

    // 20 MB/s, about ten seconds. The test is about exactness, not capacity (`bench -- tap`
    // measures that): at 100 MB/s curl, the target, the agent, the CLI and the app together
    // need about 1.5 of this machine's 2 cores, and while the test cluster is busy (just
    // started, or removing the kube tests' pods) the mirror's side was starved past what the
    // 8 MiB ring holds in 2 of 3 runs (the kernel dropped, or the app fell 16 MiB behind); at
    // 50 MB/s 9 of 9 passed then, but a later full run failed the same way once, while the
    // hypervisor took up to a third of the VM's time (vmstat's `st`).
    const answer = await sandbox.runAsync(sandbox.client, 'curl', [
      '-sS',
      '--limit-rate',
      '20M',
      '-T',
      upload,
      `http://${sandbox.targetAddress}:${port}/upload`,
    ]);
    expect(answer).toBe(sha);
    await untilCountOrStuck(() => connectionsOn(run, port).closed.length, probes + 1);
    const { closed } = connectionsOn(run, port);
    // With the agent's and the kernel's drop counters, to tell where bytes were lost.
    const counters = run.events().findLast((e) => e.event === 'counters');
    expect({ closed: closed.at(-1), counters }).toMatchObject({
      closed: { reason: 'fin', bytesDropped: 0 },
      counters: { bytesDroppedKernel: 0, bytesDroppedAgent: 0 },
    });
    expect(closed.at(-1)!.bytesReplayed).toBeGreaterThan(200 * 1024 * 1024);
    await untilCountOrStuck(() => logLines(localLog).length, 1);
    expect(logLines(targetLog)).toHaveLength(1);
    expect(logLines(localLog)).toEqual(logLines(targetLog));
    await untilAtRest(run);
    run.child.kill('SIGINT');
    await run.exited;
    expectAccounted(run.events(), { atRest: true });
    expect(agentsOf(sandbox.target)).toEqual([]);
  });

  test('a child process of the app that dies mid-session costs only its own connections', async () => {
    const portA = randomPort();
    const portB = portA + 1;
    const netnsBefore = netnsList();
    await startTarget([portA, portB]);
    const waveA = 20;
    const lateA = 10;
    const run = mirrorInto(sandbox.target, [
      process.execPath,
      join(FIXTURES, 'forking-app.mjs'),
      String(portA),
      String(portB),
      dir.path,
      String(waveA + lateA),
      '5',
    ]);
    runs.push(run);
    await untilMirroring(run, sandbox, portA);
    await untilMirroring(run, sandbox, portB);

    // Paced over two seconds: the child dies at the first bytes of its fifth connection, with
    // every connection to A and B still sending.
    const [sentA, sentB] = await Promise.all([
      clients(portA, waveA, [8 * 1024, 64 * 1024], [20, 100]),
      clients(portB, 20, [8 * 1024, 64 * 1024], [20, 100]),
    ]);
    expect(wronglyAnswered([...sentA, ...sentB])).toEqual([]);
    await untilWhileRunning(
      run,
      () => run.stdout().includes('child exited with code 7'),
      'the child to die',
    );

    // The session goes on: later connections to A are mirrored too.
    const sentLate = await clients(portA, lateA, [1024, 32 * 1024]);
    expect(wronglyAnswered(sentLate)).toEqual([]);
    // The main process exits with 5 once it has all of A's connections.
    expect(await run.exited).toBe(5);
    expect(mirrorDifferences(join(dir.path, 'main.log'), [...sentA, ...sentLate])).toEqual({
      differences: [],
      peers: { [`::ffff:${sandbox.clientAddress}`]: waveA + lateA },
      streamsNotReceived: 0,
    });
    const closedA = connectionsOn(run, portA).closed.filter((e) => (e.bytesReplayed as number) > 0);
    expect(closedA).toHaveLength(waveA + lateA);
    expect(closedA.filter((e) => e.reason !== 'fin' || e.bytesDropped !== 0)).toEqual([]);
    // The session ended with the app, possibly with bytes of B still on their way.
    expectAccounted(run.events(), { atRest: false });
    expectNothingLeft(netnsBefore, `forking-app.mjs ${portA}`);
  });

  test('an app that exits mid-traffic ends mirror with its exit code; the target’s clients never notice', async () => {
    const port = randomPort();
    const netnsBefore = netnsList();
    await startTarget([port]);
    const run = mirrorInto(sandbox.target, [
      process.execPath,
      DIGEST_SERVER,
      '--port',
      String(port),
      '--log',
      join(dir.path, 'local.log'),
      '--exit-after-seen',
      '10:9',
    ]);
    runs.push(run);
    await untilMirroring(run, sandbox, port);

    const traffic = clients(port, 30, [8 * 1024, 64 * 1024], [20, 100]);
    expect(await run.exited).toBe(9);
    expect(wronglyAnswered(await traffic)).toEqual([]);
    expectAccounted(run.events(), { atRest: false });
    expectNothingLeft(netnsBefore, `--log ${join(dir.path, 'local.log')}`);
    // The target goes on as before, without a tap.
    expect(wronglyAnswered(await clients(port, 30, [1024, 8 * 1024]))).toEqual([]);
  });
});

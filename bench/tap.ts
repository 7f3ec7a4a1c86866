/**
 * `npm run bench -- tap`: what tapping costs the target's node, and how fast the agent keeps up.
 *
 * On the cluster model of node-model.ts (the target, the agent and tcpdump on the node's CPU;
 * wrk, the sender and the session on the other):
 * (a) requests/s of an HTTP target in a netns under wrk load: with no capture (the baseline),
 *     with our tap and agent draining it into a session, and with `tcpdump -w` on the same
 *     interface; with the CPU seconds the agent (its process and its BPF program) and tcpdump
 *     spend per 1,000 requests, and their share of the node's CPU. Rounds interleave the three in
 *     a rotating order so that drift on a noisy machine hits all alike; each figure is given as
 *     its median and range over the rounds (MIRRORD_BENCH_ROUNDS, default 7).
 * (b) one TCP stream paced at rising rates (SO_MAX_PACING_RATE): the highest rate at which the
 *     agent delivers 100% of the bytes of the connection, to a session read in place (the agent's
 *     side) and to mirrord's own client (as the CLI reads), and tcpdump's capture loss at each
 *     rate; while each is sent, the node's busy share and the CPU the agent and the session's
 *     reader take.
 * The agent's peak RSS is taken throughout.
 */
import type { Counters } from '../src/protocol/messages.js';
import { connectToAgent } from '../src/protocol/client.js';
import { startLocalAgent, type LocalAgent } from '../src/platform/local/agent-process.js';
import { waitForTcp } from '../src/platform/local/netns.js';
import {
  NODE_CPU,
  meterCost,
  modelCluster,
  onCpu,
  pin,
  spread,
  type Spread,
} from './node-model.js';
import {
  createBenchHosts,
  progress,
  round,
  sampleRss,
  startHttpTarget,
  startCountingSession,
  startTcpdump,
  wrk,
  SessionTally,
  type CountedConnection,
  type BenchHosts,
} from './support.js';

const HTTP_PORT = 8080;
const STREAM_PORT = 9000;
const ROUNDS = Number(process.env.MIRRORD_BENCH_ROUNDS ?? 7);
const WRK_SECONDS = 5;
const WRK_CONNECTIONS = 32;
const STREAM_SECONDS = 2.5;
const STREAM_ROUNDS = Number(process.env.MIRRORD_BENCH_STREAM_ROUNDS ?? 3);
const RATES_GBIT = [1, 2, 3, 4, 5, 6, 8, 10];
const TAP_CONFIGS = ['none', 'tap', 'tcpdump'] as const;
type TapConfig = (typeof TAP_CONFIGS)[number];

/** Paces one connection with SO_MAX_PACING_RATE and waits for the receiver to have it all. */
const PACED_SENDER = `
import socket, sys, time
host, port, rate, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((host, port))
s.setsockopt(socket.SOL_SOCKET, 47, rate // 8)  # SO_MAX_PACING_RATE, bytes per second
chunk = bytes(range(256)) * 4096
sent, start = 0, time.monotonic()
while sent < total:
    sent += s.send(chunk[: min(len(chunk), total - sent)])
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(sent, time.monotonic() - start)
`;

/** Reads every connection to the end, then answers one byte so the sender knows. */
const DRAINING_RECEIVER = `
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(8)
buf = bytearray(1 << 20)
while True:
    conn, _ = listener.accept()
    while conn.recv_into(buf):
        pass
    conn.send(b"k")
    conn.close()
`;

/** A session for the stream: how each connection ends, and the agent's counters. */
interface StreamSession {
  agent: LocalAgent;
  nextClosed(): Promise<CountedConnection>;
  nextCounters(): Promise<Counters>;
  stop(): Promise<void>;
}

/** A session read by mirrord's own client, as the CLI reads it. */
async function startDrainingSession(hosts: BenchHosts, port: number): Promise<StreamSession> {
  const agent = await startLocalAgent({ netns: hosts.server });
  await pin(agent.pid, NODE_CPU);
  const client = await connectToAgent(agent.readiness.address, agent.readiness.port, {
    clientName: 'bench',
    secret: agent.secret,
  });
  const tally = new SessionTally();
  client.on('data', (message) => tally.take(message));
  client.on('closed', (message) => tally.take(message));
  client.on('counters', (message) => tally.take(message));
  client.on('error', (error) => progress(`  session error: ${error.message}`));
  await client.subscribe(port);
  return {
    agent,
    nextClosed: () => tally.nextClosed(),
    nextCounters: () => tally.nextCounters(),
    async stop() {
      await client.close();
      await agent.stop();
    },
  };
}

interface TapRun {
  requestsPerSecond: number;
  /** Requests answered while the cost was measured. */
  requests: number;
  seconds: number;
  nodeBusy: number;
  /** The capturing process's CPU seconds and the tap's BPF seconds (zeros for none). */
  cpu: number;
  bpf: number;
  /** The capturing process's CPU seconds by thread name. */
  threads: Record<string, number>;
  /** Bytes the session received (the agent's frames), for the tap. */
  bytes?: number;
}

async function httpOverhead(
  hosts: BenchHosts,
  agentRss: number[],
): Promise<Record<string, unknown>> {
  await startHttpTarget(hosts, HTTP_PORT);
  const url = `http://${hosts.serverAddress}:${HTTP_PORT}/orders`;
  // Each configuration gets a second of unmeasured load first: the agent's JIT warms up, as it
  // has long since in a real session, and the target and tcpdump get the same.
  const measure = async (pid: number | undefined): Promise<TapRun> => {
    await wrk(hosts, url, 1, WRK_CONNECTIONS);
    const started = Date.now();
    const cost = await meterCost(pid);
    const { requestsPerSecond, requests } = await wrk(hosts, url, WRK_SECONDS, WRK_CONNECTIONS);
    const spent = await cost.stop();
    return {
      requestsPerSecond,
      requests,
      seconds: (Date.now() - started) / 1000,
      nodeBusy: spent.nodeBusy,
      cpu: spent.user + spent.system,
      bpf: spent.bpf,
      threads: spent.threads,
    };
  };
  const runs: Record<TapConfig, TapRun[]> = { none: [], tap: [], tcpdump: [] };
  const run = async (config: TapConfig): Promise<TapRun> => {
    if (config === 'none') return measure(undefined);
    if (config === 'tcpdump') {
      const tcpdump = await startTcpdump(hosts, HTTP_PORT);
      try {
        return await measure(tcpdump.pid);
      } finally {
        await tcpdump.stop();
      }
    }
    const session = await startCountingSession(hosts, HTTP_PORT);
    try {
      const rss = sampleRss(session.agent.pid);
      const before = session.bytes();
      const measured = await measure(session.agent.pid);
      agentRss.push(rss.stop());
      const bytes = session.bytes() - before;
      if (bytes < measured.requests * 40) {
        throw new Error(`the session received only ${bytes} bytes: mirroring did not happen`);
      }
      return { ...measured, bytes };
    } finally {
      await session.stop();
    }
  };
  for (let r = 0; r < ROUNDS; r += 1) {
    // A rotating order: no configuration always runs first, or right after another.
    for (const config of TAP_CONFIGS.map((_, k) => TAP_CONFIGS[(k + r) % TAP_CONFIGS.length]!)) {
      runs[config].push(await run(config));
    }
    progress(
      `  round ${r + 1}/${ROUNDS}: ` +
        TAP_CONFIGS.map((c) => {
          const last = runs[c].at(-1)!;
          return `${c} ${round(last.requestsPerSecond, 0)} req/s (node busy ${round(last.nodeBusy, 2)}, CPU ${round(last.cpu + last.bpf, 2)} s)`;
        }).join(', '),
    );
  }
  const ratio = (config: TapConfig): Spread =>
    spread(runs[config].map((run, i) => run.requestsPerSecond / runs.none[i]!.requestsPerSecond));
  const per1k = (config: TapConfig, pick: (run: TapRun) => number): Spread =>
    spread(
      runs[config].map((run) => (pick(run) / run.requests) * 1000),
      4,
    );
  const share = (config: TapConfig): Spread =>
    spread(runs[config].map((run) => (run.cpu + run.bpf) / run.seconds));
  return {
    http_requests_per_s: {
      none: spread(
        runs.none.map((run) => run.requestsPerSecond),
        0,
      ),
      tap: spread(
        runs.tap.map((run) => run.requestsPerSecond),
        0,
      ),
      tcpdump: spread(
        runs.tcpdump.map((run) => run.requestsPerSecond),
        0,
      ),
    },
    // Each round's rate over the same round's baseline: slow drift of the machine's speed
    // cancels out within a round.
    http_ratio_to_none: { tap: ratio('tap'), tcpdump: ratio('tcpdump') },
    http_cpu_s_per_1k_requests: {
      agent: per1k('tap', (run) => run.cpu),
      tap_bpf: per1k('tap', (run) => run.bpf),
      tcpdump: per1k('tcpdump', (run) => run.cpu),
    },
    http_agent_cpu_s_per_1k_requests_by_thread: Object.fromEntries(
      [...new Set(runs.tap.flatMap((run) => Object.keys(run.threads)))].map((name) => [
        name,
        per1k('tap', (run) => run.threads[name] ?? 0),
      ]),
    ),
    http_agent_cpu_s_per_gib: spread(
      runs.tap.map((run) => (run.cpu + run.bpf) / (run.bytes! / 1024 ** 3)),
      1,
    ),
    http_share_of_node_cpu: { agent: share('tap'), tcpdump: share('tcpdump') },
    http_node_cpu_busy: {
      none: spread(runs.none.map((run) => run.nodeBusy)),
      tap: spread(runs.tap.map((run) => run.nodeBusy)),
      tcpdump: spread(runs.tcpdump.map((run) => run.nodeBusy)),
    },
  };
}

/** Sends one paced stream; returns the rate it reached in Gbit/s. */
async function sendPacedStream(
  hosts: BenchHosts,
  rateGbit: number,
): Promise<{ gbit: number; bytes: number }> {
  const bytes = Math.round((rateGbit * 1e9 * STREAM_SECONDS) / 8);
  const result = await hosts.spawn(hosts.client, 'python3', [
    '-c',
    PACED_SENDER,
    hosts.serverAddress,
    String(STREAM_PORT),
    String(rateGbit * 1e9),
    String(bytes),
  ]);
  const [sent = '0', seconds = '1'] = String(result.stdout).trim().split(' ');
  return { gbit: (Number(sent) * 8) / Number(seconds) / 1e9, bytes: Number(sent) };
}

/** Who reads the session in the stream test. */
type StreamReader = 'in_place' | 'cli_client';
const STREAM_READERS: readonly StreamReader[] = ['in_place', 'cli_client'];

interface StreamRun {
  complete: boolean;
  gbit: number;
  result: string;
  shares: { node_busy: number; agent: number; reader: number };
  rss: number;
}

/** Sends one paced stream at `rate` Gbit/s through an agent to `reader`. */
async function streamOnce(
  hosts: BenchHosts,
  rate: number,
  reader: StreamReader,
): Promise<StreamRun> {
  const session: StreamSession =
    reader === 'in_place'
      ? await startCountingSession(hosts, STREAM_PORT, { decode: true })
      : await startDrainingSession(hosts, STREAM_PORT);
  try {
    const rss = sampleRss(session.agent.pid);
    const closed = session.nextClosed();
    // While the stream is sent: the node's busy share, and the shares of a CPU the agent and
    // this process (the session's reader, on the laptop's CPU) take, to tell who falls behind.
    const cost = await meterCost(session.agent.pid);
    const readerBefore = process.cpuUsage();
    const started = performance.now();
    const sent = await sendPacedStream(hosts, rate);
    const spent = await cost.stop();
    const readerSpent = process.cpuUsage(readerBefore);
    const seconds = (performance.now() - started) / 1000;
    const outcome = await Promise.race([
      closed,
      new Promise<undefined>((resolve) => setTimeout(resolve, 10_000)),
    ]);
    const peakRss = rss.stop();
    // Sent after the stream ended, so they cover all of it.
    const dropped = await session.nextCounters();
    const complete = outcome?.reason === 'fin' && outcome.bytes === sent.bytes;
    return {
      complete,
      gbit: sent.gbit,
      result: complete
        ? `100% at ${sent.gbit.toFixed(2)} Gbit/s`
        : `${(((outcome?.bytes ?? 0) / sent.bytes) * 100).toFixed(1)}% (${outcome?.reason ?? 'no close'}; ` +
          `kernel dropped ${dropped.bytesDroppedKernel} bytes, agent ${dropped.bytesDroppedAgent})`,
      shares: {
        node_busy: round(spent.nodeBusy, 2),
        agent: round((spent.user + spent.system) / seconds, 2),
        reader: round((readerSpent.user + readerSpent.system) / 1e6 / seconds, 2),
      },
      rss: peakRss,
    };
  } finally {
    await session.stop();
  }
}

/**
 * The stream at rising rates, read two ways: by a session that decodes each frame in place in
 * one reused read buffer (the agent's side: a reader that keeps up), and by mirrord's own
 * client, as the CLI reads; and tcpdump's loss at each rate. A reader stops at its first loss.
 * The whole ladder runs STREAM_ROUNDS times: one pass of a stream says little on a noisy VM.
 */
async function singleStream(
  hosts: BenchHosts,
  agentRss: number[],
): Promise<Record<string, unknown>> {
  hosts.spawn(
    hosts.server,
    ...onCpu(NODE_CPU, 'python3', [
      '-c',
      DRAINING_RECEIVER,
      hosts.serverAddress,
      String(STREAM_PORT),
    ]),
  );
  await waitForTcp(hosts.client, hosts.serverAddress, STREAM_PORT);
  const lossless: Record<StreamReader, number[]> = { in_place: [], cli_client: [] };
  const rounds: Record<string, unknown>[] = [];
  for (let r = 0; r < STREAM_ROUNDS; r += 1) {
    progress(`  stream round ${r + 1}/${STREAM_ROUNDS}`);
    const reached: Record<StreamReader, number> = { in_place: 0, cli_client: 0 };
    const broken = new Set<StreamReader>();
    const tcpdumpLoss: Record<string, number> = {};
    const results: Record<string, Partial<Record<StreamReader, string>>> = {};
    const cpuShares: Record<string, Partial<Record<StreamReader, StreamRun['shares']>>> = {};
    for (const rate of RATES_GBIT) {
      results[`${rate}`] = {};
      cpuShares[`${rate}`] = {};
      for (const reader of STREAM_READERS.filter((name) => !broken.has(name))) {
        const run = await streamOnce(hosts, rate, reader);
        agentRss.push(run.rss);
        results[`${rate}`]![reader] = run.result;
        cpuShares[`${rate}`]![reader] = run.shares;
        if (run.complete) reached[reader] = round(run.gbit, 2);
        else broken.add(reader);
        progress(
          `    ${rate} Gbit/s, ${reader}: agent ${run.result}; while sent: node busy ` +
            `${run.shares.node_busy}, agent ${run.shares.agent} of a CPU, reader ${run.shares.reader}`,
        );
      }
      const tcpdump = await startTcpdump(hosts, STREAM_PORT);
      await sendPacedStream(hosts, rate);
      const stats = await tcpdump.stats();
      tcpdumpLoss[`${rate}`] = round((stats.dropped / (stats.captured + stats.dropped)) * 100, 2);
      progress(`    ${rate} Gbit/s: tcpdump lost ${tcpdumpLoss[`${rate}`]}%`);
      if (broken.size === STREAM_READERS.length) break;
    }
    for (const reader of STREAM_READERS) lossless[reader].push(reached[reader]);
    rounds.push({
      lossless_gbit_per_s: reached,
      tcpdump_loss_percent_by_gbit_per_s: tcpdumpLoss,
      result_by_gbit_per_s: results,
      cpu_share_by_gbit_per_s: cpuShares,
    });
  }
  return {
    stream_lossless_gbit_per_s: {
      in_place: spread(lossless.in_place, 2),
      cli_client: spread(lossless.cli_client, 2),
    },
    stream_rounds: rounds,
  };
}

export async function benchTap(): Promise<Record<string, unknown>> {
  const hosts = createBenchHosts();
  const restore = await modelCluster(hosts);
  const agentRss: number[] = [];
  try {
    progress('(a) HTTP target under wrk: no capture vs tap+agent vs tcpdump');
    const http = await httpOverhead(hosts, agentRss);
    progress('(b) one paced TCP stream at rising rates');
    const stream = await singleStream(hosts, agentRss);
    return { ...http, ...stream, agent_rss_max_mib: round(Math.max(...agentRss), 1) };
  } finally {
    restore();
    hosts.destroy();
  }
}

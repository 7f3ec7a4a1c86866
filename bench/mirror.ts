/**
 * `npm run bench -- mirror`: what mirroring costs a loaded target's node, and how much of the
 * target's traffic reaches the local app, how late.
 *
 * On the cluster model of node-model.ts (the target and the agent on the node's CPU; the load,
 * the CLI and the local app on the other), an HTTP target in a netns gets keep-alive load over 32
 * connections from vegeta (vegeta.ts): paced evenly at 1k, 5k and 10k requests/s, and as fast as
 * the target answers. Each rate runs in four
 * configurations: nothing else (the baseline), `mirrord mirror` replaying into a local app (the
 * same server program, under the layer), the agent alone serving a session that only counts
 * bytes (the node's side of mirroring without the laptop's), and tcpdump capturing the target's
 * port (the peer).
 * Rounds interleave the configurations, in a rotating order, so that a noisy machine's drift
 * hits all alike; each figure is given as its median and range over the rounds, each ratio as
 * the median and range of the same round's ratios.
 *
 * Target and app note when each request arrived, keyed by the client's port and the request's
 * position on its connection (the app sees the original port through the layer), on the one
 * clock of this machine: so fraction and lag are measured outside mirrord, not taken from its
 * own counters (those are printed beside them). The agent's cost (CPU seconds and BPF run time,
 * per 1,000 requests and per GiB it copied, and as a share of the node's CPU) and peak RSS are
 * measured while the load runs, and tcpdump's likewise. The local app's own capacity is
 * measured first, because "every request reaches the app" can only hold at rates the app itself
 * can serve.
 *
 * MIRRORD_BENCH_ROUNDS sets the rounds (default 5), MIRRORD_BENCH_RATES the paced rates (default
 * 1000,5000,10000; the run at the target's maximum always comes last).
 */
import { execa, type ResultPromise } from 'execa';
import { readFileSync, rmSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitForTcp } from '../src/platform/local/netns.js';
import { packageRoot } from '../src/package-root.js';
import { waitFor } from '../test/support/wait.js';
import {
  LAPTOP_CPU,
  NODE_CPU,
  meterCost,
  modelCluster,
  onCpu,
  onLaptop,
  pin,
  showSpread,
  spread,
  type Cost,
  type CostMeter,
  type Spread,
} from './node-model.js';
import {
  createBenchHosts,
  percentile,
  progress,
  round,
  sampleRss,
  startCountingSession,
  startTcpdump,
  type BenchHosts,
} from './support.js';
import { vegetaLoad, type Load } from './vegeta.js';

const PORT = 8080;
const LOCAL_CAPACITY_PORT = 18080;
const SECONDS = 5;
const CONNECTIONS = 32;
const RATES = (process.env.MIRRORD_BENCH_RATES ?? '1000,5000,10000').split(',').map(Number);
const CATCH_UP_MS = 1500;
const ROUNDS = Number(process.env.MIRRORD_BENCH_ROUNDS ?? 5);
const CONFIGS = ['none', 'mirror', 'agent', 'tcpdump'] as const;
type Config = (typeof CONFIGS)[number];

const STAMPING_SERVER = fileURLToPath(new URL('./stamping-server.js', import.meta.url));
const CLI = join(packageRoot(), 'bin', 'run.js');
const GIB = 1024 ** 3;

/** The load of one run, from the client netns (or this one) on the laptop's CPU. */
function load(origin: string, rate: number | undefined, netns?: string): Promise<Load> {
  return vegetaLoad(netns, origin, rate, SECONDS, CONNECTIONS);
}

/** A load on the target and what it cost the node over the measured attack. */
interface Metered {
  result: Load;
  spent: Cost;
  seconds: number;
}

/**
 * Loads the target from the client netns, metering `pid` (the agent, tcpdump, or nothing) and
 * the node from the end of the warm-up to the end of the load: the same window as the
 * latencies, and as the tap benchmark's. The warm-up's second is where a new agent's JIT
 * compiles its hot path, once per agent, while a session lasts minutes; each run here starts a
 * new agent.
 */
async function meteredLoad(
  hosts: BenchHosts,
  pid: number | undefined,
  rate: number | undefined,
  onWindow?: () => void,
): Promise<Metered> {
  let meter: CostMeter | undefined;
  let started = 0;
  const result = await vegetaLoad(
    hosts.client,
    `http://${hosts.serverAddress}:${PORT}`,
    rate,
    SECONDS,
    CONNECTIONS,
    async () => {
      onWindow?.();
      started = Date.now();
      meter = await meterCost(pid);
    },
  );
  const spent = await meter!.stop();
  const seconds = (Date.now() - started) / 1000;
  return { result, spent, seconds };
}

interface Count {
  /** Requests noted (measured ones). */
  value: number;
  /** Resolves with the next count printed. */
  next(): Promise<number>;
}

/** Follows the `count N` lines a stamping server prints. */
function counted(child: ResultPromise): Count {
  let waiting: ((value: number) => void)[] = [];
  const count: Count = {
    value: 0,
    next: () => new Promise((resolve) => waiting.push(resolve)),
  };
  child.stdout?.on('data', (chunk: Buffer) => {
    for (const match of chunk.toString().matchAll(/count (\d+)/g)) count.value = Number(match[1]);
    const resolvers = waiting;
    waiting = [];
    for (const resolve of resolvers) resolve(count.value);
  });
  return count;
}

function readStamps(file: string): Map<string, number> {
  const stamps = new Map<string, number>();
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const [key, micros] = line.split(' ');
    if (key && micros) stamps.set(key, Number(micros));
  }
  return stamps;
}

interface Target {
  child: ResultPromise;
  count: Count;
  stop(): Promise<void>;
}

/** The target, on the node's CPU. */
async function startTarget(hosts: BenchHosts, stampsFile: string): Promise<Target> {
  const child = hosts.spawn(
    hosts.server,
    ...onCpu(NODE_CPU, process.execPath, [
      STAMPING_SERVER,
      hosts.serverAddress,
      String(PORT),
      stampsFile,
    ]),
  );
  const count = counted(child);
  await waitForTcp(hosts.client, hosts.serverAddress, PORT);
  return {
    child,
    count,
    async stop() {
      child.kill('SIGTERM');
      await child;
    },
  };
}

/** One run's figures; those of one configuration only are undefined in the others. */
interface Run extends Load {
  /** The node CPU's busy fraction while the load ran. */
  nodeBusy: number;
  /** The capturing process's CPU seconds (user, system) and the tap's BPF seconds, per run. */
  user?: number;
  system?: number;
  bpf?: number;
  /** The agent's CPU seconds by thread name. */
  threads?: Record<string, number>;
  seconds: number;
  bytesCopied?: number;
  agentRssMiB?: number;
  cliRssMiB?: number;
  fractionReachingApp?: number;
  lagP50Ms?: number;
  lagP99Ms?: number;
  /** The agent alone: from the tap's stamp to the counting session, the node's part of the lag. */
  nodeLagP50Ms?: number;
  nodeLagP99Ms?: number;
  cliLagP99Ms?: number | null;
  tcpdumpLoss?: number;
}

/** The agent the CLI started for its session: its child running the `agent` command. */
async function agentOf(cliPid: number): Promise<number> {
  const { stdout } = await execa('pgrep', ['-P', String(cliPid), '-f', 'run.js agent'], {
    reject: false,
  });
  const pid = Number(stdout.trim().split('\n')[0]);
  if (!pid) throw new Error('the CLI started no agent');
  return pid;
}

/** One load run with the app under `mirrord mirror`; the agent moved to the node's CPU. */
async function runMirrored(hosts: BenchHosts, dir: string, rate: number | undefined): Promise<Run> {
  const targetStamps = join(dir, 'target');
  const appStamps = join(dir, 'app');
  const target = await startTarget(hosts, targetStamps);
  const mirror = execa(
    ...onLaptop(process.execPath, [
      CLI,
      'mirror',
      '--netns',
      hosts.server,
      '--json',
      '--',
      process.execPath,
      STAMPING_SERVER,
      '0.0.0.0',
      String(PORT),
      appStamps,
    ]),
    { reject: false, all: true },
  );
  const app = counted(mirror);
  const events: { event: string; lagP99Ms?: number | null; bytesCopied?: number }[] = [];
  mirror.stdout?.on('data', (chunk: Buffer) => {
    for (const line of chunk.toString().split('\n')) {
      if (line.startsWith('{"event"')) events.push(JSON.parse(line) as (typeof events)[number]);
    }
  });
  const cliRss = sampleRss(mirror.pid!);
  try {
    await waitFor(
      "mirror's listen event",
      () => {
        if (mirror.exitCode !== null) throw new Error(`mirror exited: ${String(mirror.all)}`);
        return events.some((e) => e.event === 'listen');
      },
      { ms: 60_000 },
    );
    const agent = await agentOf(mirror.pid!);
    await pin(agent, NODE_CPU);
    const agentRss = sampleRss(agent);
    const copiedBefore = events.findLast((e) => e.event === 'counters')?.bytesCopied ?? 0;
    // The node's figures cover the load alone: a laptop that lags (see node-model.ts) must not
    // stretch the window they are shares of.
    const { result, spent, seconds } = await meteredLoad(hosts, agent, rate);
    // The target's count, from a line printed after the load ended.
    await target.count.next();
    // Until the app has every request the target got, or nothing more came for a while.
    let last = -1;
    let still = Date.now();
    while (app.value < target.count.value && Date.now() - still < CATCH_UP_MS) {
      if (app.value !== last) [last, still] = [app.value, Date.now()];
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const agentRssMiB = agentRss.stop();
    mirror.kill('SIGINT');
    await mirror;
    await target.stop();
    const atTarget = readStamps(targetStamps);
    const atApp = readStamps(appStamps);
    const lags: number[] = [];
    for (const [key, arrived] of atTarget) {
      const replayed = atApp.get(key);
      if (replayed !== undefined) lags.push((replayed - arrived) / 1000);
    }
    lags.sort((a, b) => a - b);
    const totals = events.findLast((e) => e.event === 'counters');
    return {
      ...result,
      ...spent,
      seconds,
      bytesCopied: (totals?.bytesCopied ?? 0) - copiedBefore,
      agentRssMiB,
      cliRssMiB: cliRss.stop(),
      fractionReachingApp: lags.length / atTarget.size,
      lagP50Ms: percentile(lags, 0.5),
      lagP99Ms: percentile(lags, 0.99),
      cliLagP99Ms: totals?.lagP99Ms ?? null,
    };
  } finally {
    cliRss.stop();
    mirror.kill('SIGKILL');
    target.child.kill('SIGKILL');
  }
}

/** One load run with nothing else, or with tcpdump capturing the target's port. */
async function runPlain(
  hosts: BenchHosts,
  rate: number | undefined,
  withTcpdump: boolean,
): Promise<Run> {
  const target = await startTarget(hosts, '/dev/null');
  const tcpdump = withTcpdump ? await startTcpdump(hosts, PORT) : undefined;
  try {
    const { result, spent, seconds } = await meteredLoad(hosts, tcpdump?.pid, rate);
    const run: Run = { ...result, nodeBusy: spent.nodeBusy, seconds };
    if (!tcpdump) return run;
    const stats = await tcpdump.stats();
    return {
      ...run,
      user: spent.user,
      system: spent.system,
      tcpdumpLoss: stats.dropped / Math.max(1, stats.captured + stats.dropped),
    };
  } finally {
    await tcpdump?.stop();
    await target.stop();
  }
}

/**
 * One load run with the agent serving a session that only counts what it receives: the node's
 * side of mirroring without the laptop's (no CLI decoding frames, no replay, no app beside the
 * load generator on its CPU). Set against the mirror runs, it tells which side a cost is on.
 */
async function runAgentAlone(hosts: BenchHosts, rate: number | undefined): Promise<Run> {
  const target = await startTarget(hosts, '/dev/null');
  const session = await startCountingSession(hosts, PORT, { decode: true });
  try {
    const bytesBefore = session.bytes();
    const { result, spent, seconds } = await meteredLoad(
      hosts,
      session.agent.pid,
      rate,
      () => (session.lags.length = 0),
    );
    if (session.bytes() - bytesBefore < result.requests * 40) {
      throw new Error(`the session received ${session.bytes() - bytesBefore} bytes: no mirroring`);
    }
    // Cut at the load's end: what the agent sends after it (its last drain) is left out.
    const lags = [...session.lags].sort((a, b) => a - b);
    return {
      ...result,
      ...spent,
      seconds,
      nodeLagP50Ms: percentile(lags, 0.5),
      nodeLagP99Ms: percentile(lags, 0.99),
    };
  } finally {
    await session.stop();
    await target.stop();
  }
}

/** What the local app serves at most, on loopback, alone on the laptop's CPU. */
async function localAppCapacity(): Promise<number> {
  const app = execa(
    process.execPath,
    [STAMPING_SERVER, '127.0.0.1', String(LOCAL_CAPACITY_PORT), '/dev/null'],
    { reject: false },
  );
  try {
    let listening = false;
    app.stdout?.once('data', () => (listening = true));
    await waitFor('the local app to listen', () => listening, { ms: 10_000 });
    return (await load(`http://127.0.0.1:${LOCAL_CAPACITY_PORT}`, undefined)).requestsPerSecond;
  } finally {
    app.kill('SIGTERM');
    await app;
  }
}

/** The figures of one rate over every round. */
function figuresOf(runs: Record<Config, Run[]>): Record<string, unknown> {
  const { none, mirror, agent, tcpdump } = runs;
  const of = (list: Run[], pick: (run: Run) => number | undefined, digits = 3): Spread =>
    spread(
      list.map((run) => pick(run) ?? NaN),
      digits,
    );
  const ratio = (list: Run[], pick: (run: Run) => number): Spread =>
    spread(list.map((run, i) => pick(run) / pick(none[i]!)));
  const byConfig = (pick: (run: Run) => number, digits = 2) => ({
    none: of(none, pick, digits),
    mirror: of(mirror, pick, digits),
    agent: of(agent, pick, digits),
    tcpdump: of(tcpdump, pick, digits),
  });
  const cpu = (run: Run): number => (run.user ?? 0) + (run.system ?? 0) + (run.bpf ?? 0);
  return {
    target_rps: byConfig((run) => run.requestsPerSecond, 0),
    target_p50_ms: byConfig((run) => run.p50Ms),
    target_p99_ms: byConfig((run) => run.p99Ms),
    target_p999_ms: byConfig((run) => run.p999Ms),
    // Each round's figure over the same round's baseline.
    rps_ratio: {
      mirror: ratio(mirror, (run) => run.requestsPerSecond),
      agent: ratio(agent, (run) => run.requestsPerSecond),
      tcpdump: ratio(tcpdump, (run) => run.requestsPerSecond),
    },
    p99_ratio: {
      mirror: ratio(mirror, (run) => run.p99Ms),
      agent: ratio(agent, (run) => run.p99Ms),
      tcpdump: ratio(tcpdump, (run) => run.p99Ms),
    },
    node_cpu_busy: byConfig((run) => run.nodeBusy, 3),
    agent_cpu_s_per_1k_requests: {
      user: of(mirror, (run) => (run.user! / run.requests) * 1000, 4),
      system: of(mirror, (run) => (run.system! / run.requests) * 1000, 4),
      bpf: of(mirror, (run) => (run.bpf! / run.requests) * 1000, 4),
      total: of(mirror, (run) => (cpu(run) / run.requests) * 1000, 4),
    },
    agent_cpu_s_per_1k_requests_by_thread: Object.fromEntries(
      [...new Set(mirror.flatMap((run) => Object.keys(run.threads ?? {})))].map((name) => [
        name,
        of(mirror, (run) => ((run.threads?.[name] ?? 0) / run.requests) * 1000, 4),
      ]),
    ),
    tcpdump_cpu_s_per_1k_requests: of(tcpdump, (run) => (cpu(run) / run.requests) * 1000, 4),
    agent_cpu_s_per_gib: of(mirror, (run) => cpu(run) / (run.bytesCopied! / GIB), 1),
    agent_share_of_node_cpu: of(mirror, (run) => cpu(run) / run.seconds),
    agent_alone_share_of_node_cpu: of(agent, (run) => cpu(run) / run.seconds),
    tcpdump_share_of_node_cpu: of(tcpdump, (run) => cpu(run) / run.seconds),
    agent_rss_max_mib: of(mirror, (run) => run.agentRssMiB, 1),
    fraction_reaching_app: of(mirror, (run) => run.fractionReachingApp, 4),
    lag_p50_ms: of(mirror, (run) => run.lagP50Ms),
    lag_p99_ms: of(mirror, (run) => run.lagP99Ms),
    cli_reported_lag_p99_ms: of(mirror, (run) => run.cliLagP99Ms ?? undefined),
    agent_alone_lag_p50_ms: of(agent, (run) => run.nodeLagP50Ms),
    agent_alone_lag_p99_ms: of(agent, (run) => run.nodeLagP99Ms),
    tcpdump_loss: of(tcpdump, (run) => run.tcpdumpLoss, 4),
    cli_rss_max_mib: of(mirror, (run) => run.cliRssMiB, 1),
  };
}

export async function benchMirror(): Promise<Record<string, unknown>> {
  const hosts = createBenchHosts();
  const dir = mkdtempSync(join(tmpdir(), 'mirrord-bench-mirror-'));
  const restore = await modelCluster(hosts);
  try {
    const appCapacity = await localAppCapacity();
    progress(`local app alone on CPU ${LAPTOP_CPU}: ${appCapacity.toFixed(0)} requests/s`);
    const figures: Record<string, unknown> = {
      rounds: ROUNDS,
      local_app_max_rps: round(appCapacity, 0),
    };
    const rates = [...RATES, undefined];
    const runs = rates.map(
      () => ({ none: [], mirror: [], agent: [], tcpdump: [] }) as Record<Config, Run[]>,
    );
    for (let r = 0; r < ROUNDS; r += 1) {
      for (const [i, rate] of rates.entries()) {
        // A rotating order: no configuration always runs first, or right after another.
        const order = CONFIGS.map((_, k) => CONFIGS[(k + r + i) % CONFIGS.length]!);
        for (const config of order) {
          const run =
            config === 'mirror'
              ? await runMirrored(hosts, dir, rate)
              : config === 'agent'
                ? await runAgentAlone(hosts, rate)
                : await runPlain(hosts, rate, config === 'tcpdump');
          runs[i]![config].push(run);
          progress(
            `round ${r + 1}/${ROUNDS} ${rate ?? 'max'} req/s ${config}: ${round(run.requestsPerSecond, 0)} req/s, p99 ${round(run.p99Ms, 2)} ms, node busy ${round(run.nodeBusy, 2)}` +
              (run.user === undefined
                ? ''
                : `, CPU ${round(run.user + run.system! + (run.bpf ?? 0), 2)} s`) +
              (run.nodeLagP99Ms === undefined
                ? ''
                : `, node lag p50 ${round(run.nodeLagP50Ms!, 2)} ms, p99 ${round(run.nodeLagP99Ms, 2)} ms`) +
              (run.fractionReachingApp === undefined
                ? ''
                : `, mirrored ${round(run.fractionReachingApp, 4)}, lag p99 ${round(run.lagP99Ms!, 2)} ms, agent RSS ${round(run.agentRssMiB!, 1)} MiB`),
          );
        }
      }
    }
    for (const [i, rate] of rates.entries()) {
      const label = rate ? `at_${rate}_rps` : 'at_target_max';
      const rateFigures = figuresOf(runs[i]!);
      figures[label] = rateFigures;
      const ratios = rateFigures as {
        p99_ratio: { mirror: Spread; agent: Spread };
        rps_ratio: { mirror: Spread };
      };
      progress(
        `${label}: p99 with/without ${showSpread(ratios.p99_ratio.mirror)} (the agent alone: ${showSpread(ratios.p99_ratio.agent)}), requests/s with/without ${showSpread(ratios.rps_ratio.mirror)}`,
      );
    }
    return figures;
  } finally {
    restore();
    hosts.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * `npm run bench -- outgoing`: the app's outgoing connections and look-ups through the target
 * (the layer's connect and getaddrinfo, the CLI, the agent's sockets and resolver in the target's
 * namespaces, src/features/outgoing/) against the same program run directly in the target's
 * netns (`ip netns exec`, which also lays /etc/netns/TARGET over /etc), in one run.
 *
 * The target is a netns whose peer (a second netns) only it reaches: this machine's route to the
 * test range is a blackhole, checked before any load, so a connection that did not go through
 * the target fails instead of leaving the machine. In the peer: an echo, a sink and a source
 * (outgoing-servers.mjs); in the target: a hosts file and a dnsmasq that each know one name.
 *
 * One app process per configuration and round (outgoing-client.mjs) does every iteration and
 * prints its own timings, so the mirror session's set-up is in no figure; it warms up first
 * (two whole transfers each way, 500 connects, 200 look-ups of each name: a fresh CLI and agent
 * reach their steady speed only after about 500 MB):
 * - throughput: one connection downloading, then one uploading, TRANSFER_MIB MiB (MB/s);
 * - connect latency: CONNECTS sequential connects, each until a small message came back from
 *   the echo (p50, p99);
 * - look-up latency: LOOKUPS sequential getaddrinfo of the hosts file's name and of the
 *   nameserver's (p50, p99).
 * Rounds (MIRRORD_BENCH_ROUNDS, default 7) alternate which configuration goes first; each figure
 * is the median over the rounds with its range, each ratio the median of the rounds' ratios.
 */
import type { ResultPromise } from 'execa';
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHosts, isStale, waitForTcp } from '../src/platform/local/netns.js';
import { execaGuarded, KILL_ALL } from '../src/platform/local/guarded.js';
import { checkRoutedLocally, ensureBlackhole } from '../test/cluster/host.js';
import { waitFor } from '../test/support/wait.js';
import { spread, showSpread, type Spread } from './node-model.js';
import { machineName, progress } from './support.js';

const ROUNDS = Number(process.env.MIRRORD_BENCH_ROUNDS ?? 7);
const TRANSFER_MIB = 256;
const CONNECTS = 2000;
const LOOKUPS = 1000;
const HOSTS_NAME = 'peer.only-target.test';
const DNS_NAME = 'dns.only-target.test';
/** The target's nameserver, on its own loopback: nothing on this machine answers there. */
const NAMESERVER = '127.0.0.53';
const PREFIX = 'mirrord-bench';
/** A run that takes longer than this is stopped (a hang, not a slow path). */
const APP_TIMEOUT_MS = 180_000;
const TARGETS = { throughputRatio: 0.5, connectP99Ms: 5 };

const CLIENT = fileURLToPath(new URL('../../bench/outgoing-client.mjs', import.meta.url));
const SERVERS = fileURLToPath(new URL('../../bench/outgoing-servers.mjs', import.meta.url));
const CLI = fileURLToPath(new URL('../../bin/run.js', import.meta.url));

const CONFIGS = ['direct', 'mirrored'] as const;
type Config = (typeof CONFIGS)[number];

/** What outgoing-client.mjs prints. */
interface Percentiles {
  p50: number;
  p99: number;
  max: number;
}
interface AppFigures {
  downloadMbps: number;
  uploadMbps: number;
  connects: Percentiles;
  lookups: Record<string, Percentiles>;
}

/** The /etc/netns dirs of killed runs (their netns is gone or its maker is). */
function removeStaleEtc(): void {
  if (!existsSync('/etc/netns')) return;
  for (const name of readdirSync('/etc/netns')) {
    if (name.startsWith(`${PREFIX}-outgoing-`) && isStale(name)) {
      rmSync(join('/etc/netns', name), { recursive: true, force: true });
    }
  }
}

export async function benchOutgoing(): Promise<Record<string, unknown>> {
  const machine = machineName();
  progress(
    `outgoing: ${machine}; ${ROUNDS} rounds of ${TRANSFER_MIB} MiB each way, ${CONNECTS} connects, ` +
      `${LOOKUPS} look-ups of each of two names`,
  );
  removeStaleEtc();
  // Load goes to the peer's address: were the namespaces not to come up, or a connection not to
  // go through the target, the blackhole drops it instead of the default route carrying it off.
  ensureBlackhole();
  const hosts = createHosts(PREFIX, 'outgoing', {
    serverAddress: '10.213.252.1',
    clientAddress: '10.213.252.2',
  });
  const target = hosts.server;
  const peer = hosts.clientAddress;
  const etc = `/etc/netns/${target}`;
  let running: ResultPromise | undefined;
  let cleaned: Promise<void> | undefined;
  const cleanUp = (): Promise<void> =>
    (cleaned ??= (async () => {
      if (running && running.exitCode === null) {
        // The guard passes SIGTERM on: mirror stops its app and agent; all of it dies in 10 s.
        running.kill('SIGTERM');
        const timer = setTimeout(() => running?.kill(KILL_ALL), 10_000);
        await running;
        clearTimeout(timer);
      }
      hosts.destroy();
      rmSync(etc, { recursive: true, force: true });
    })());
  const interrupted = (signal: NodeJS.Signals): void => {
    void cleanUp().finally(() => process.exit(signal === 'SIGTERM' ? 143 : 130));
  };
  // `on`, not `once`: execa's exit hook re-raises a signal that no other listener is left for,
  // which would end this process before the clean-up above has finished.
  process.on('SIGINT', interrupted);
  process.on('SIGTERM', interrupted);
  try {
    checkRoutedLocally(peer);
    mkdirSync(etc, { recursive: true });
    writeFileSync(join(etc, 'hosts'), `127.0.0.1 localhost\n${peer} ${HOSTS_NAME}\n`);
    writeFileSync(
      join(etc, 'resolv.conf'),
      `nameserver ${NAMESERVER}\noptions timeout:2 attempts:2\n`,
    );
    const servers = hosts.spawn(hosts.client, process.execPath, [
      SERVERS,
      peer,
      String(TRANSFER_MIB * 1024 * 1024),
    ]);
    let ready = '';
    servers.stdout!.on('data', (chunk: Buffer) => (ready += chunk.toString()));
    hosts.spawn(target, 'dnsmasq', [
      '--keep-in-foreground',
      '--conf-file=/dev/null',
      '--no-resolv',
      '--no-hosts',
      '--user=root',
      `--listen-address=${NAMESERVER}`,
      '--bind-interfaces',
      '--port=53',
      `--address=/${DNS_NAME}/${peer}`,
    ]);
    await waitFor('the peer servers', () => {
      if (servers.exitCode !== null) throw new Error('the peer servers exited');
      return ready.includes('ready');
    });
    await waitForTcp(target, peer, 7101);
    await waitFor('the target’s nameserver', async () => {
      const dig = await hosts.spawn(target, 'dig', [
        '+short',
        '+time=1',
        '+tries=1',
        `@${NAMESERVER}`,
        DNS_NAME,
      ]);
      return String(dig.stdout).includes(peer);
    });

    const appArgs = [CLIENT, peer, String(TRANSFER_MIB * 1024 * 1024), String(CONNECTS)];
    appArgs.push(String(LOOKUPS), HOSTS_NAME, DNS_NAME);
    const commands: Record<Config, [string, string[]]> = {
      direct: ['ip', ['netns', 'exec', target, process.execPath, ...appArgs]],
      mirrored: [
        process.execPath,
        [CLI, 'mirror', '--netns', target, '--', process.execPath, ...appArgs],
      ],
    };
    const runApp = async (config: Config): Promise<AppFigures> => {
      const [file, args] = commands[config];
      running = execaGuarded(file, args, { stdin: 'ignore', stdout: 'pipe', stderr: 'pipe' });
      const timer = setTimeout(() => running?.kill(KILL_ALL), APP_TIMEOUT_MS);
      const result = await running;
      clearTimeout(timer);
      const last = String(result.stdout).trim().split('\n').at(-1) ?? '';
      if (result.exitCode !== 0 || !last.startsWith('{')) {
        throw new Error(
          `the ${config} app failed (${result.exitCode ?? result.signal}):\n${String(result.stdout)}\n${String(result.stderr)}`,
        );
      }
      return JSON.parse(last) as AppFigures;
    };

    const runs: Record<Config, AppFigures[]> = { direct: [], mirrored: [] };
    for (let r = 0; r < ROUNDS; r++) {
      // A rotating order: drift on a noisy machine hits both configurations alike.
      for (let k = 0; k < CONFIGS.length; k++) {
        const config = CONFIGS[(r + k) % CONFIGS.length]!;
        runs[config].push(await runApp(config));
      }
      const line = CONFIGS.map((config) => {
        const f = runs[config].at(-1)!;
        const hostsLookup = f.lookups[HOSTS_NAME]!;
        const dnsLookup = f.lookups[DNS_NAME]!;
        return (
          `${config} down ${f.downloadMbps.toFixed(0)} up ${f.uploadMbps.toFixed(0)} MB/s, ` +
          `connect ${f.connects.p50.toFixed(3)}/${f.connects.p99.toFixed(3)} ms, ` +
          `hosts ${hostsLookup.p50.toFixed(3)}/${hostsLookup.p99.toFixed(3)} ms, ` +
          `dns ${dnsLookup.p50.toFixed(3)}/${dnsLookup.p99.toFixed(3)} ms`
        );
      }).join('; ');
      progress(`  round ${r + 1}/${ROUNDS} (p50/p99): ${line}`);
    }

    const of = (config: Config, pick: (f: AppFigures) => number, digits = 3): Spread =>
      spread(runs[config].map(pick), digits);
    const both = (pick: (f: AppFigures) => number, digits = 3): Record<Config, Spread> => ({
      direct: of('direct', pick, digits),
      mirrored: of('mirrored', pick, digits),
    });
    // Each round's mirrored figure over the same round's direct one.
    const ratio = (pick: (f: AppFigures) => number): Spread =>
      spread(
        runs.mirrored.map((f, i) => pick(f) / pick(runs.direct[i]!)),
        2,
      );
    const download = (f: AppFigures): number => f.downloadMbps;
    const upload = (f: AppFigures): number => f.uploadMbps;
    const figures = {
      download_mb_per_s: both(download, 0),
      upload_mb_per_s: both(upload, 0),
      download_mirrored_over_direct: ratio(download),
      upload_mirrored_over_direct: ratio(upload),
      connect_echo_ms: {
        p50: both((f) => f.connects.p50),
        p99: both((f) => f.connects.p99),
      },
      lookup_hosts_file_ms: {
        p50: both((f) => f.lookups[HOSTS_NAME]!.p50),
        p99: both((f) => f.lookups[HOSTS_NAME]!.p99),
      },
      lookup_nameserver_ms: {
        p50: both((f) => f.lookups[DNS_NAME]!.p50),
        p99: both((f) => f.lookups[DNS_NAME]!.p99),
      },
    };
    const checks = {
      download_ratio_at_least_0_5:
        figures.download_mirrored_over_direct.median >= TARGETS.throughputRatio,
      upload_ratio_at_least_0_5:
        figures.upload_mirrored_over_direct.median >= TARGETS.throughputRatio,
      connect_p99_at_most_5_ms: figures.connect_echo_ms.p99.mirrored.median <= TARGETS.connectP99Ms,
    };

    const rows: [string, string, string, string][] = [
      [
        'download MB/s',
        ...cells(figures.download_mb_per_s),
        showSpread(figures.download_mirrored_over_direct),
      ],
      [
        'upload MB/s',
        ...cells(figures.upload_mb_per_s),
        showSpread(figures.upload_mirrored_over_direct),
      ],
      ['connect+echo p50 ms', ...cells(figures.connect_echo_ms.p50), ''],
      ['connect+echo p99 ms', ...cells(figures.connect_echo_ms.p99), ''],
      ['getaddrinfo hosts file p50 ms', ...cells(figures.lookup_hosts_file_ms.p50), ''],
      ['getaddrinfo hosts file p99 ms', ...cells(figures.lookup_hosts_file_ms.p99), ''],
      ['getaddrinfo nameserver p50 ms', ...cells(figures.lookup_nameserver_ms.p50), ''],
      ['getaddrinfo nameserver p99 ms', ...cells(figures.lookup_nameserver_ms.p99), ''],
    ];
    progress(
      table(['figure (median, min–max, rounds)', 'direct', 'mirrored', 'mirrored/direct'], rows),
    );
    const met = (ok: boolean): string => (ok ? 'met' : 'NOT met');
    progress(
      `targets: download ratio ≥ ${TARGETS.throughputRatio}: ${met(checks.download_ratio_at_least_0_5)}; ` +
        `upload ratio ≥ ${TARGETS.throughputRatio}: ${met(checks.upload_ratio_at_least_0_5)}; ` +
        `connect p99 ≤ ${TARGETS.connectP99Ms} ms: ${met(checks.connect_p99_at_most_5_ms)}`,
    );
    return {
      machine,
      rounds: ROUNDS,
      transfer_mib: TRANSFER_MIB,
      connects: CONNECTS,
      lookups: LOOKUPS,
      ...figures,
      targets_met: checks,
    };
  } finally {
    process.off('SIGINT', interrupted);
    process.off('SIGTERM', interrupted);
    await cleanUp();
  }
}

function cells(value: Record<Config, Spread>): [string, string] {
  return [showSpread(value.direct), showSpread(value.mirrored)];
}

/** A Markdown table, its columns padded. */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const line = (cols: string[]): string =>
    `| ${cols.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

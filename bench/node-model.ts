/**
 * The cluster the benchmarks model on one 2-core machine, and what they measure of it.
 *
 * CPU 0 is the target's node: the target, the agent, tcpdump (the peer it is compared with), and
 * the kernel's receive work for the target's interface (RPS steers it there, as a NIC's interrupt
 * would be on the node). CPU 1 is everyone else: the users' load generator, the developer's CLI
 * and local app, the kernel's receive work for the client's interface, and the benchmark itself.
 * So what mirroring costs the node is not mixed with what it costs the developer's machine. On
 * that one CPU the users come first: the CLI and the local app run at nice 19 (onLaptop), as on
 * a cluster the developer's machine takes nothing from the users' load generator; a starved
 * load generator would make the target look slow.
 *
 * The agent's cost is its process's CPU time (user and system, from /proc) plus its BPF
 * program's run time, which the kernel charges to no process (softirq) and counts only while
 * `kernel.bpf_stats_enabled` is set (the benchmarks set it, for every configuration alike, and
 * restore it).
 */
import { execa } from 'execa';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { median, type BenchHosts } from './support.js';

export const NODE_CPU = 0;
export const LAPTOP_CPU = 1;

/** `command args` to run on `cpu` (its threads and children too). */
export function onCpu(cpu: number, command: string, args: string[]): [string, string[]] {
  return ['taskset', ['-c', String(cpu), command, ...args]];
}

/** `command args` as the developer's machine runs it: after the users (nice 19). */
export function onLaptop(command: string, args: string[]): [string, string[]] {
  return ['nice', ['-n', '19', command, ...args]];
}

/**
 * Moves every thread of process `pid` to `cpu`, at the normal priority (an agent started by a
 * CLI on the laptop inherits its CPU and nice value); threads it starts later follow them.
 */
export async function pin(pid: number, cpu: number): Promise<void> {
  await execa('taskset', ['-a', '-p', '-c', String(cpu), String(pid)], { stdout: 'ignore' });
  // setpriority(2) on a thread id changes that thread only: each is set.
  const threads = readdirSync(`/proc/${pid}/task`);
  await execa('renice', ['-n', '0', '-p', ...threads], { stdout: 'ignore', reject: false });
}

/**
 * Sets up the model: this process (and what it starts) on the laptop's CPU, receive work for the
 * target's interface on the node's CPU and for the client's on the laptop's, BPF run-time stats
 * on. Returns what undoes the machine-wide part.
 */
export async function modelCluster(hosts: BenchHosts): Promise<() => void> {
  await pin(process.pid, LAPTOP_CPU);
  for (const [netns, cpu] of [
    [hosts.server, NODE_CPU],
    [hosts.client, LAPTOP_CPU],
  ] as const) {
    await execa('ip', [
      'netns',
      'exec',
      netns,
      'sh',
      '-c',
      `echo ${(1 << cpu).toString(16)} > /sys/class/net/eth0/queues/rx-0/rps_cpus`,
    ]);
  }
  const statsFile = '/proc/sys/kernel/bpf_stats_enabled';
  const before = readFileSync(statsFile, 'utf8').trim();
  writeFileSync(statsFile, '1');
  return () => writeFileSync(statsFile, before);
}

/** User and system time of a process so far, from its ticks: the meter uses only their split. */
interface ProcessCpu {
  user: number;
  system: number;
}

const TICKS_PER_SECOND = 100; // USER_HZ, what /proc reports times in on Linux

/** User and system ticks of a /proc stat file (a process's, or one thread's), in seconds. */
function ticksOfStat(file: string): ProcessCpu {
  // Fields after the command (which may hold spaces), from the last ')': utime is the 14th field
  // of the line, stime the 15th.
  const stat = readFileSync(file, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return {
    user: Number(fields[11]) / TICKS_PER_SECOND,
    system: Number(fields[12]) / TICKS_PER_SECOND,
  };
}

/**
 * Each live thread's run time so far, summed by thread name, in seconds. From schedstat (the
 * scheduler's own nanoseconds), not from the ticks of /proc stat: those charge a whole tick
 * (4 ms here) to whichever task runs at the tick, and an agent that wakes on a timer every few
 * milliseconds can be charged far more, or less, than it ran.
 */
function threadCpu(pid: number): Map<string, number> {
  const byName = new Map<string, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      const nanos = Number(
        readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0],
      );
      byName.set(name, (byName.get(name) ?? 0) + nanos / 1e9);
    } catch {
      // The thread ended.
    }
  }
  return byName;
}

/** Run time of the tap's BPF programs so far (every agent's: one runs at a time), in seconds. */
async function tapProgramSeconds(): Promise<number> {
  const { stdout } = await execa('bpftool', ['prog', 'show', '--json']);
  const programs = JSON.parse(stdout) as { name?: string; run_time_ns?: number }[];
  const nanos = programs
    .filter((p) => p.name === 'tap_eth' || p.name === 'tap_l3')
    .reduce((sum, p) => sum + (p.run_time_ns ?? 0), 0);
  return nanos / 1e9;
}

/**
 * Idle seconds of `cpu` so far. /proc/stat counts idle (and iowait) time exactly on a tickless
 * kernel, where the other fields are whole ticks charged to whatever was running at each tick.
 */
function idleSeconds(cpu: number): number {
  const line = readFileSync('/proc/stat', 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`cpu${cpu} `));
  const ticks = (line ?? '').split(/\s+/).slice(1).map(Number);
  return ((ticks[3] ?? 0) + (ticks[4] ?? 0)) / TICKS_PER_SECOND;
}

/** What a process and the tap cost over a window. */
export interface Cost {
  user: number;
  system: number;
  bpf: number;
  /** The process's CPU seconds by thread name (threads that ended meanwhile are left out). */
  threads: Record<string, number>;
  /** The node CPU's busy fraction over the window. */
  nodeBusy: number;
}

/** Started by meterCost; stop() gives the differences. */
export interface CostMeter {
  stop(): Promise<Cost>;
}

/**
 * Starts measuring process `pid` (user and system CPU seconds, or zeros when there is none),
 * the tap's BPF run time and the node CPU's busy fraction, until stop().
 */
export async function meterCost(pid: number | undefined): Promise<CostMeter> {
  const none = { user: 0, system: 0 };
  const ticks0 = pid ? ticksOfStat(`/proc/${pid}/stat`) : none;
  const threads0 = pid ? threadCpu(pid) : new Map<string, number>();
  const bpf0 = await tapProgramSeconds();
  const idle0 = idleSeconds(NODE_CPU);
  const wall0 = performance.now();
  return {
    async stop() {
      const ticks1 = pid ? ticksOfStat(`/proc/${pid}/stat`) : none;
      const threads1 = pid ? threadCpu(pid) : new Map<string, number>();
      const threads: Record<string, number> = {};
      let total = 0;
      for (const [name, seconds] of threads1) {
        threads[name] = seconds - (threads0.get(name) ?? 0);
        total += threads[name];
      }
      const bpf1 = await tapProgramSeconds();
      const idle1 = idleSeconds(NODE_CPU);
      const wall = (performance.now() - wall0) / 1000;
      const user = ticks1.user - ticks0.user;
      const system = ticks1.system - ticks0.system;
      // The ticks' split applied to the measured run time.
      const userShare = user + system > 0 ? user / (user + system) : 1;
      return {
        user: total * userShare,
        system: total * (1 - userShare),
        bpf: bpf1 - bpf0,
        threads,
        nodeBusy: 1 - (idle1 - idle0) / Math.max(1e-9, wall),
      };
    },
  };
}

/** The median and the range of a figure over rounds. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  runs: number;
}

export function spread(values: number[], digits = 3): Spread {
  const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  const fixed = (v: number | undefined): number => Number((v ?? NaN).toFixed(digits));
  return {
    median: fixed(sorted.length ? median(sorted) : NaN),
    min: fixed(sorted[0]),
    max: fixed(sorted.at(-1)),
    runs: sorted.length,
  };
}

/** "0.98 (0.95–1.01, 5 runs)": how a spread reads in progress lines and the README. */
export function showSpread({ median, min, max, runs }: Spread): string {
  return `${median} (${min}–${max}, ${runs} runs)`;
}

/**
 * `npm run bench -- forward`: how fast the agent→CLI stream flows through a Kubernetes
 * port-forward (openPortForward) on the real test cluster, against a direct TCP connection to
 * the same sender.
 *
 * The sender is a process in a pod of the test cluster (test/support/kube.ts; started if none
 * runs) that writes STREAM_MIB MiB to each connection as fast as it is taken, then closes.
 * Forward: TLS and WebSocket v4.channel.k8s.io to kube-apiserver, which proxies the upgraded
 * connection to the kubelet (TLS again), which proxies it to containerd's streaming server,
 * which dials the port inside the pod's netns and copies between that connection and the
 * WebSocket. Direct: a TCP connection from this machine to the pod's IP (routed to the pod
 * bridge). Each reader is a child process running this file and measures from its first byte to
 * the end, so connection set-up is not charged to the stream. Rounds alternate the two paths so
 * that drift on a noisy machine hits both alike; the figures are medians with their spread.
 *
 * CPU time per GiB is reported for the reader (the client's cost), for the sender, and, during
 * forward rounds, for each process on the forward's path (from /proc/PID/stat). Those processes
 * serve other clients too (tests of other namespaces may run on the same cluster): their CPU
 * time per second during direct rounds, when no stream goes through them, is reported as
 * their background. The machine's idle share during each kind of round tells a path that is
 * short of CPU from one that waits between its hops.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { openPortForward } from '../src/platform/kube/port-forward.js';
import { PIDS } from '../test/cluster/layout.js';
import { NODE_IMAGE, containerProcesses, testCluster } from '../test/support/kube.js';
import { waitFor } from '../test/support/wait.js';
import { median, progress, round } from './support.js';

const execFileAsync = promisify(execFile);
const NAMESPACE = 'bench-forward';
const SENDER_PORT = 9100;
const STREAM_MIB = 1024;
const ROUNDS = 7;
const MiB = 1024 * 1024;
/** The processes a forward's bytes go through, as test/cluster names their pid files. */
const PATH_PROCESSES = ['kube-apiserver', 'kubelet', 'containerd'] as const;
/** Clock ticks per second of /proc/PID/stat's times (USER_HZ, 100 on Linux). */
const CLOCK_TICKS = 100;

/** Writes STREAM_MIB MiB of one random 1 MiB buffer to each connection, as fast as it is taken. */
const SENDER = `
const chunk = require('crypto').randomBytes(${MiB});
require('net').createServer((socket) => {
  socket.on('error', () => {});
  let left = ${STREAM_MIB};
  const pump = () => {
    while (left > 0) {
      left -= 1;
      if (!socket.write(chunk)) return void socket.once('drain', pump);
    }
    socket.end();
  };
  pump();
}).listen(${SENDER_PORT});
`;

interface ReaderResult {
  /** Bytes after the first chunk, over the time from the first chunk to the end. */
  mibPerSecond: number;
  bytes: number;
  /** The reader's user+system CPU time over the same span, per GiB read. */
  cpuMsPerGib: number;
}

/** Reads a stream to its end; run inside the reader child. */
function measure(stream: Readable): Promise<ReaderResult> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let counted = 0;
    let start = 0n;
    let cpuStart: NodeJS.CpuUsage | undefined;
    stream.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
      if (start === 0n) {
        start = process.hrtime.bigint();
        cpuStart = process.cpuUsage();
      } else {
        counted += chunk.length;
      }
    });
    stream.once('error', reject);
    stream.once('end', () => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const cpu = process.cpuUsage(cpuStart);
      resolve({
        mibPerSecond: counted / MiB / seconds,
        bytes,
        cpuMsPerGib: (cpu.user + cpu.system) / 1000 / (counted / (1024 * MiB)),
      });
    });
  });
}

/** The reader child: `forward KUBECONFIG NAMESPACE POD PORT` or `direct HOST PORT`. */
async function runReader(args: string[]): Promise<void> {
  const [mode, ...rest] = args;
  let stream: Readable;
  if (mode === 'forward') {
    const [kubeconfig = '', namespace = '', pod = '', port = ''] = rest;
    const config = new KubeConfig();
    config.loadFromFile(kubeconfig);
    stream = await openPortForward(config, namespace, pod, Number(port));
  } else {
    const [host = '', port = ''] = rest;
    stream = net.connect(Number(port), host);
  }
  console.log(JSON.stringify(await measure(stream)));
}

async function read(args: string[]): Promise<ReaderResult> {
  const self = fileURLToPath(import.meta.url);
  const { stdout } = await execFileAsync(process.execPath, [self, ...args], { encoding: 'utf8' });
  const result = JSON.parse(stdout) as ReaderResult;
  if (result.bytes !== STREAM_MIB * MiB) {
    throw new Error(`the reader got ${result.bytes} bytes, not ${STREAM_MIB} MiB`);
  }
  return result;
}

/** User+system CPU time of a process (all its threads) so far, in ms. */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name, in parentheses, may hold spaces: fields are counted after its end.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLOCK_TICKS;
}

/** The pid of the one process in the container `containerId` (`containerd://<hex>`). */
function containerPid(containerId: string): number {
  const pids = containerProcesses(containerId);
  if (pids.length !== 1) {
    throw new Error(`expected one process in container ${containerId}, found ${pids.length}`);
  }
  return pids[0]!;
}

/** The machine's CPU time so far, in clock ticks: all of it, and the idle part. */
function machineTicks(): { total: number; idle: number } {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1);
  // user nice system idle iowait irq softirq steal (guest time is counted in user already).
  const ticks = fields.slice(0, 8).map(Number);
  return { total: ticks.reduce((a, b) => a + b, 0), idle: ticks[3]! + ticks[4]! };
}

/** min–max of a list, rounded like the medians. */
function spread(values: number[], digits: number): [number, number] {
  return [round(Math.min(...values), digits), round(Math.max(...values), digits)];
}

export async function benchForward(): Promise<Record<string, unknown>> {
  progress('forward: the test cluster (started if none runs)');
  const cluster = await testCluster(NAMESPACE);
  const stop = (): void => {
    void cluster.remove().finally(() => process.exit(130));
  };
  process.once('SIGINT', stop);
  try {
    // A pod of its own rather than addPod's: the sender needs none of the fixtures that addPod
    // mounts (whose path it finds from the source tree, not from .bench-out).
    await cluster.core.createNamespacedPod({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'sender' },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            {
              name: 'sender',
              image: NODE_IMAGE,
              imagePullPolicy: 'Never',
              command: ['node', '-e', SENDER],
              ports: [{ containerPort: SENDER_PORT }],
              readinessProbe: { tcpSocket: { port: SENDER_PORT }, periodSeconds: 1 },
            },
          ],
        },
      },
    });
    const pod = await waitFor(
      'the sender pod to be ready',
      async () => {
        const pod = await cluster.core.readNamespacedPod({ name: 'sender', namespace: NAMESPACE });
        const ready = pod.status?.conditions?.some(
          (c) => c.type === 'Ready' && c.status === 'True',
        );
        return ready && pod;
      },
      { ms: 120_000, everyMs: 250 },
    );
    const podIp = pod.status!.podIP!;
    const senderPid = containerPid(pod.status!.containerStatuses![0]!.containerID!);
    const pathPids = Object.fromEntries(
      PATH_PROCESSES.map((name) => [name, Number(readFileSync(join(PIDS, name), 'utf8'))]),
    ) as Record<(typeof PATH_PROCESSES)[number], number>;
    const watched = { ...pathPids, sender: senderPid };
    type Watched = keyof typeof watched;

    const paths = {
      forward: () =>
        read(['forward', cluster.kubeconfig, NAMESPACE, 'sender', String(SENDER_PORT)]),
      direct: () => read(['direct', podIp, String(SENDER_PORT)]),
    };
    const results: Record<keyof typeof paths, ReaderResult[]> = { forward: [], direct: [] };
    const cpuPerGib: Record<keyof typeof paths, Record<Watched, number[]>> = {
      forward: { 'kube-apiserver': [], kubelet: [], containerd: [], sender: [] },
      direct: { 'kube-apiserver': [], kubelet: [], containerd: [], sender: [] },
    };
    const idlePercent: Record<keyof typeof paths, number[]> = { forward: [], direct: [] };
    const backgroundPerSecond: Record<Watched, number[]> = {
      'kube-apiserver': [],
      kubelet: [],
      containerd: [],
      sender: [],
    };
    // One unmeasured pass each: the readers' code and the sender warm up.
    await paths.forward();
    await paths.direct();
    const gib = STREAM_MIB / 1024;
    for (let round = 0; round < ROUNDS; round += 1) {
      const order: (keyof typeof paths)[] =
        round % 2 ? ['direct', 'forward'] : ['forward', 'direct'];
      for (const path of order) {
        const names = Object.keys(watched) as Watched[];
        const before = names.map((name) => cpuMs(watched[name]));
        const machineBefore = machineTicks();
        const started = process.hrtime.bigint();
        const result = await paths[path]();
        const seconds = Number(process.hrtime.bigint() - started) / 1e9;
        const machine = machineTicks();
        const idle =
          (100 * (machine.idle - machineBefore.idle)) / (machine.total - machineBefore.total);
        idlePercent[path].push(idle);
        results[path].push(result);
        const used = names.map((name, i) => cpuMs(watched[name]) - before[i]!);
        names.forEach((name, i) => {
          cpuPerGib[path][name].push(used[i]! / gib);
          if (path === 'direct') backgroundPerSecond[name].push(used[i]! / seconds);
        });
        const cpu = names.map((name, i) => `${name} ${(used[i]! / gib).toFixed(0)}`).join(', ');
        progress(
          `  round ${round + 1} ${path}: ${result.mibPerSecond.toFixed(0)} MiB/s, machine ${idle.toFixed(0)} % idle; ms CPU/GiB: reader ${result.cpuMsPerGib.toFixed(0)}, ${cpu}`,
        );
      }
    }
    const speeds = (path: keyof typeof paths) => results[path].map((r) => r.mibPerSecond);
    const forward = median(speeds('forward'));
    const direct = median(speeds('direct'));
    const medians = (values: Record<Watched, number[]>, names: Watched[]) =>
      Object.fromEntries(names.map((name) => [name, round(median(values[name]), 0)]));
    return {
      stream_mib: STREAM_MIB,
      rounds: ROUNDS,
      forward_mib_per_s: round(forward, 1),
      forward_mib_per_s_min_max: spread(speeds('forward'), 1),
      direct_mib_per_s: round(direct, 1),
      direct_mib_per_s_min_max: spread(speeds('direct'), 1),
      forward_to_direct_ratio: round(forward / direct),
      forward_reader_cpu_ms_per_gib: round(median(results.forward.map((r) => r.cpuMsPerGib)), 0),
      direct_reader_cpu_ms_per_gib: round(median(results.direct.map((r) => r.cpuMsPerGib)), 0),
      forward_cpu_ms_per_gib: medians(cpuPerGib.forward, [...PATH_PROCESSES, 'sender']),
      direct_sender_cpu_ms_per_gib: round(median(cpuPerGib.direct.sender), 0),
      background_cpu_ms_per_s: medians(backgroundPerSecond, [...PATH_PROCESSES]),
      forward_machine_idle_percent: round(median(idlePercent.forward), 0),
      direct_machine_idle_percent: round(median(idlePercent.direct), 0),
    };
  } finally {
    process.off('SIGINT', stop);
    await cluster.remove();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  await runReader(process.argv.slice(2));
}

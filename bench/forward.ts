/**
 * `npm run bench -- forward`: how fast the agent→CLI stream flows through a Kubernetes
 * port-forward (openPortForward), against a direct TCP connection to the same sender.
 *
 * The sender is a process in a pod of the stand-in cluster (test/kube/) that writes STREAM_MIB
 * MiB to each connection as fast as it is taken, then closes. Forward: the stand-in API server
 * on loopback, which copies between its connection to the pod (made inside the pod's netns, as
 * a kubelet makes it) and TLS and WebSocket v4.channel.k8s.io to a reader running
 * openPortForward. Direct: a reader in the cluster's client netns connected to the pod IP. Each
 * reader is a child process running this file (so the reader never shares a thread with the API
 * server) and measures from its first byte to the end: connection set-up (the stand-in's dialer
 * process starting in the pod's netns) is not charged to the stream. Rounds alternate the two
 * paths so that drift on a noisy machine hits both alike; the figures are medians. The CPU time
 * per GiB of the reader (the client's cost) and of this process during a forward round (the
 * stand-in API server's cost, which it alone spends then) are reported too.
 */
import { KubeConfig } from '@kubernetes/client-node';
import { execFile } from 'node:child_process';
import net from 'node:net';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { openPortForward } from '../src/platform/kube/port-forward.js';
import { startStandInCluster } from '../test/kube/cluster.js';
import { median, progress, round } from './support.js';

const execFileAsync = promisify(execFile);
const SENDER_PORT = 9100;
const STREAM_MIB = 1024;
const ROUNDS = 7;
const MiB = 1024 * 1024;

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

async function read(command: string, args: string[]): Promise<ReaderResult> {
  const { stdout } = await execFileAsync(command, args, { encoding: 'utf8' });
  const result = JSON.parse(stdout) as ReaderResult;
  if (result.bytes !== STREAM_MIB * MiB) {
    throw new Error(`the reader got ${result.bytes} bytes, not ${STREAM_MIB} MiB`);
  }
  return result;
}

export async function benchForward(): Promise<Record<string, unknown>> {
  const self = fileURLToPath(import.meta.url);
  progress('forward: starting the stand-in cluster');
  const cluster = await startStandInCluster();
  const stop = (): void => {
    void cluster.close().finally(() => process.exit(130));
  };
  process.once('SIGINT', stop);
  try {
    const pod = await cluster.addPod({
      name: 'sender',
      containers: [
        {
          name: 'sender',
          image: 'stand-in/local',
          command: [process.execPath, '-e', SENDER],
          ports: [{ containerPort: SENDER_PORT }],
        },
      ],
    });
    const paths = {
      forward: () =>
        read(process.execPath, [
          self,
          'forward',
          cluster.kubeconfigPath,
          pod.namespace,
          pod.name,
          String(SENDER_PORT),
        ]),
      direct: () =>
        read('ip', [
          'netns',
          'exec',
          cluster.clientNetns,
          process.execPath,
          self,
          'direct',
          pod.ip,
          String(SENDER_PORT),
        ]),
    };
    const results: Record<keyof typeof paths, ReaderResult[]> = { forward: [], direct: [] };
    const serverCpuMsPerGib: number[] = [];
    // One unmeasured pass each: the dialer's and the readers' code warm in the page cache.
    await paths.forward();
    await paths.direct();
    for (let round = 0; round < ROUNDS; round += 1) {
      const order: (keyof typeof paths)[] =
        round % 2 ? ['direct', 'forward'] : ['forward', 'direct'];
      for (const path of order) {
        const cpuStart = process.cpuUsage();
        const result = await paths[path]();
        results[path].push(result);
        let line = `  round ${round + 1} ${path}: ${result.mibPerSecond.toFixed(0)} MiB/s, reader ${result.cpuMsPerGib.toFixed(0)} ms CPU/GiB`;
        if (path === 'forward') {
          const cpu = process.cpuUsage(cpuStart);
          const serverMs = (cpu.user + cpu.system) / 1000 / (STREAM_MIB / 1024);
          serverCpuMsPerGib.push(serverMs);
          line += `, API server ${serverMs.toFixed(0)} ms CPU/GiB`;
        }
        progress(line);
      }
    }
    const forward = median(results.forward.map((r) => r.mibPerSecond));
    const direct = median(results.direct.map((r) => r.mibPerSecond));
    return {
      stream_mib: STREAM_MIB,
      rounds: ROUNDS,
      forward_mib_per_s: round(forward, 1),
      direct_mib_per_s: round(direct, 1),
      forward_to_direct_ratio: round(forward / direct),
      forward_reader_cpu_ms_per_gib: round(median(results.forward.map((r) => r.cpuMsPerGib)), 0),
      direct_reader_cpu_ms_per_gib: round(median(results.direct.map((r) => r.cpuMsPerGib)), 0),
      forward_api_server_cpu_ms_per_gib: round(median(serverCpuMsPerGib), 0),
    };
  } finally {
    process.off('SIGINT', stop);
    await cluster.close();
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  await runReader(process.argv.slice(2));
}

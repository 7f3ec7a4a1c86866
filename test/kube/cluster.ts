/**
 * A stand-in for a one-node Kubernetes cluster, for tests (test code only, never shipped):
 * an HTTPS API server speaking the real wire formats, with the controllers and a kubelet that
 * runs pods as local processes in their own network namespaces and cgroups. See
 * /test/kube/README.md for what is real and what is simplified.
 *
 * ```ts
 * const cluster = await startStandInCluster();
 * const target = await cluster.addDeployment({
 *   name: 'api',
 *   containers: [{ name: 'api', image: 'stand-in/local', command: ['node', 'server.js'],
 *                  ports: [{ containerPort: 8080 }] }],
 * });
 * // KubeConfig.loadFromFile(cluster.kubeconfigPath) …; pods answer at target.pods[0].ip
 * // from cluster.clientNetns.
 * await cluster.close();
 * ```
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { admitPod } from './admission.js';
import { ApiServer, type RecordedRequest } from './api-server.js';
import { CgroupTree } from './cgroups.js';
import { FaultState, type ClusterFaults } from './faults.js';
import { GarbageCollector } from './garbage-collector.js';
import { JobController } from './job-controller.js';
import { Kubelet, type ContainerInfo } from './kubelet.js';
import { NODE_IP, PodNetwork } from './pod-network.js';
import { Scheduler } from './scheduler.js';
import { ObjectStore } from './store.js';
import { createTlsMaterial } from './tls.js';
import { TtlController } from './ttl-controller.js';
import {
  ownerReferenceTo,
  type Container,
  type Job,
  type KubeObject,
  type Pod,
  type PodTemplateSpec,
  type Workload,
} from './types.js';
import { WorkloadControllers, templateHash } from './workload-controllers.js';

export type { ClusterFaults } from './faults.js';
export type { RecordedRequest } from './api-server.js';
export type { ContainerInfo } from './kubelet.js';

export interface StandInContainerSpec {
  name: string;
  /** `stand-in/local` (the command runs as given) or an image whose repository ends in mirrord-agent. */
  image: string;
  command: string[];
  args?: string[];
  env?: { name: string; value: string }[];
  /** Declared ports also serve as the readiness probe: Ready once each accepts connections. */
  ports?: { containerPort: number; name?: string }[];
}

export interface StandInPodSpec {
  name: string;
  namespace?: string;
  /** Pod labels (default `{ app: name }`); a workload's selector is the same labels. */
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  containers: StandInContainerSpec[];
  /** Wait until every pod is Ready (default); false: resolve once the objects exist. */
  wait?: boolean;
}

export interface StandInWorkloadSpec extends StandInPodSpec {
  replicas?: number;
}

export interface PodHandle {
  name: string;
  namespace: string;
  uid: string;
  /** The pod IP, reachable from `clientNetns`. */
  ip: string;
  /** The pod's network namespace (as `ip netns` names it). */
  netns: string;
  /** Each container's id (`containerd://<64 hex>`) and pid. */
  containers: ContainerInfo[];
  /** The pod as the API has it now; undefined once deleted. */
  object(): Pod | undefined;
}

export interface WorkloadHandle {
  kind: 'Deployment' | 'StatefulSet';
  name: string;
  namespace: string;
  uid: string;
  /** spec.selector.matchLabels. */
  selector: Record<string, string>;
  /** The pods, once Ready (empty with `wait: false`). */
  pods: PodHandle[];
  object(): Workload | undefined;
}

export interface StandInCluster {
  /** `https://127.0.0.1:PORT`. */
  url: string;
  /** Server + CA data, token user, context `stand-in` (namespace default), current-context set. */
  kubeconfigPath: string;
  /** The bearer token the kubeconfig carries. */
  token: string;
  /** The CA certificate (PEM) that signed the server's certificate. */
  caPem: string;
  namespace: 'default';
  nodeName: string;
  /** The netns where tests run real clients that reach pod IPs. */
  clientNetns: string;
  addPod(spec: StandInPodSpec): Promise<PodHandle>;
  addDeployment(spec: StandInWorkloadSpec): Promise<WorkloadHandle>;
  addStatefulSet(spec: StandInWorkloadSpec): Promise<WorkloadHandle>;
  faults: ClusterFaults;
  /** Every API request received, in order. */
  requests: RecordedRequest[];
  jobs(namespace?: string): Job[];
  pods(namespace?: string): Pod[];
  /** Pids of the container processes that run. */
  processes(): number[];
  /** Kills every container process, removes every netns, veth and cgroup it made. */
  close(): Promise<void>;
}

export interface StandInOptions {
  /** Multiplies ttlSecondsAfterFinished (e.g. 0.01 turns 60 s into 0.6 s). Default 1. */
  ttlScale?: number;
  nodeName?: string;
  /** How long addPod/addDeployment/addStatefulSet wait for Ready pods (default 60 s). */
  readyTimeoutMs?: number;
}

const USER = 'stand-in-user';

function kubeconfig(url: string, caPem: string, token: string): string {
  const ca = Buffer.from(caPem).toString('base64');
  return [
    'apiVersion: v1',
    'kind: Config',
    'clusters:',
    '  - name: stand-in',
    '    cluster:',
    `      server: ${url}`,
    `      certificate-authority-data: ${ca}`,
    'users:',
    '  - name: stand-in',
    '    user:',
    `      token: ${token}`,
    'contexts:',
    '  - name: stand-in',
    '    context:',
    '      cluster: stand-in',
    '      user: stand-in',
    '      namespace: default',
    'current-context: stand-in',
    '',
  ].join('\n');
}

function podTemplate(spec: StandInPodSpec, labels: Record<string, string>): PodTemplateSpec {
  const containers: Container[] = spec.containers.map((c) => ({
    name: c.name,
    image: c.image,
    command: c.command,
    ...(c.args ? { args: c.args } : {}),
    ...(c.env ? { env: c.env } : {}),
    ...(c.ports ? { ports: c.ports.map((p) => ({ ...p, protocol: 'TCP' })) } : {}),
  }));
  return {
    metadata: { labels, ...(spec.annotations ? { annotations: spec.annotations } : {}) },
    spec: { containers, restartPolicy: 'Always' },
  };
}

function isReady(pod: Pod): boolean {
  return (pod.status.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
}

function describePod(pod: Pod): string {
  const waiting = (pod.status.containerStatuses ?? [])
    .map((s) => s.state.waiting?.reason)
    .filter(Boolean);
  const unscheduled = pod.status.conditions?.find(
    (c) => c.type === 'PodScheduled' && c.status === 'False',
  );
  return `${pod.metadata.name} ${pod.status.phase}${waiting.length ? ` (${waiting.join(', ')})` : ''}${unscheduled ? ` (${unscheduled.reason}: ${unscheduled.message})` : ''}`;
}

export async function startStandInCluster(options: StandInOptions = {}): Promise<StandInCluster> {
  const nodeName = options.nodeName ?? 'stand-in-node';
  const readyTimeoutMs = options.readyTimeoutMs ?? 60_000;
  const dir = mkdtempSync(join(tmpdir(), 'mirrord-stand-in-'));
  const store = new ObjectStore();
  const faults = new FaultState();
  const requests: RecordedRequest[] = [];
  const closers: (() => void | Promise<void>)[] = [
    () => rmSync(dir, { recursive: true, force: true }),
  ];
  const closeAll = async (): Promise<void> => {
    let failure: unknown;
    for (const close of closers.splice(0).reverse()) {
      try {
        await close();
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure) throw failure;
  };

  try {
    const tls = createTlsMaterial(dir);
    const network = PodNetwork.create();
    closers.push(() => network.close());
    const cgroups = new CgroupTree();
    closers.push(() => cgroups.close());

    for (const name of ['default', 'kube-system', 'kube-public', 'kube-node-lease']) {
      store.create('namespaces', {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name, labels: { 'kubernetes.io/metadata.name': name } },
        spec: { finalizers: ['kubernetes'] },
        status: { phase: 'Active' },
      } as KubeObject);
    }
    const nodeLabels = {
      'kubernetes.io/arch': 'amd64',
      'kubernetes.io/hostname': nodeName,
      'kubernetes.io/os': 'linux',
    };
    store.create('nodes', {
      apiVersion: 'v1',
      kind: 'Node',
      metadata: { name: nodeName, labels: nodeLabels },
      spec: {},
      status: {
        addresses: [
          { type: 'InternalIP', address: NODE_IP },
          { type: 'Hostname', address: nodeName },
        ],
        conditions: [{ type: 'Ready', status: 'True', reason: 'KubeletReady' }],
        nodeInfo: {
          kubeletVersion: 'v1.31.0',
          containerRuntimeVersion: 'containerd://1.7.20',
          operatingSystem: 'linux',
          architecture: 'amd64',
        },
      },
    } as KubeObject);

    const kubelet = new Kubelet(store, nodeName, network, cgroups, faults);
    closers.push(() => kubelet.close());
    const collector = new GarbageCollector(store);
    const scheduler = new Scheduler(store, { name: nodeName, labels: nodeLabels }, faults);
    const jobController = new JobController(store, collector);
    const ttlController = new TtlController(store, collector, options.ttlScale ?? 1);
    const workloads = new WorkloadControllers(store);
    closers.push(() => {
      for (const controller of [scheduler, jobController, ttlController, workloads, collector]) {
        controller.close();
      }
    });

    const token = randomBytes(24).toString('hex');
    const server = await ApiServer.start({
      tls,
      token,
      user: USER,
      store,
      faults,
      collector,
      kubelet,
      requests,
    });
    closers.push(() => server.close());
    const kubeconfigPath = join(dir, 'kubeconfig');
    writeFileSync(kubeconfigPath, kubeconfig(server.url, tls.caPem, token), { mode: 0o600 });

    const ensureNamespace = (namespace: string): void => {
      if (store.get('namespaces', undefined, namespace)) return;
      store.create('namespaces', {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: namespace },
      });
    };

    const handleOf = (pod: Pod): PodHandle => {
      const uid = pod.metadata.uid ?? '';
      const info = kubelet.runtimeInfo(uid);
      const namespace = pod.metadata.namespace ?? 'default';
      const name = pod.metadata.name ?? '';
      return {
        name,
        namespace,
        uid,
        ip: info?.ip ?? '',
        netns: info?.netns ?? '',
        containers: info?.containers ?? [],
        object: () => {
          const current = store.get<Pod>('pods', namespace, name);
          return current?.metadata.uid === uid ? current : undefined;
        },
      };
    };

    /** Waits until `count` pods picked by `select` are Ready; their handles, by name. */
    const readyPods = async (
      what: string,
      count: number,
      select: (pod: Pod) => boolean,
    ): Promise<PodHandle[]> => {
      const deadline = Date.now() + readyTimeoutMs;
      for (;;) {
        const pods = store
          .list<Pod>('pods')
          .filter((p) => select(p) && !p.metadata.deletionTimestamp);
        const ready = pods.filter(isReady);
        if (ready.length >= count) {
          return ready
            .sort((a, b) =>
              (a.metadata.name ?? '').localeCompare(b.metadata.name ?? '', 'en', { numeric: true }),
            )
            .slice(0, count)
            .map(handleOf);
        }
        if (Date.now() > deadline) {
          throw new Error(
            `stand-in cluster: ${what} did not get ${count} Ready pod(s) within ${readyTimeoutMs} ms: ${pods.map(describePod).join('; ') || 'no pods'}`,
          );
        }
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    };

    const ownedBy = (uid: string) => (pod: Pod) =>
      Boolean(pod.metadata.ownerReferences?.some((ref) => ref.uid === uid));

    const addWorkload = async (
      kind: 'Deployment' | 'StatefulSet',
      spec: StandInWorkloadSpec,
    ): Promise<WorkloadHandle> => {
      const namespace = spec.namespace ?? 'default';
      ensureNamespace(namespace);
      const labels = spec.labels ?? { app: spec.name };
      const replicas = spec.replicas ?? 1;
      const template = podTemplate(spec, labels);
      const metadata = {
        name: spec.name,
        namespace,
        labels,
        ...(spec.annotations ? { annotations: spec.annotations } : {}),
      };
      const resource = kind === 'Deployment' ? 'deployments' : 'statefulsets';
      const workload = store.create<Workload>(resource, {
        apiVersion: 'apps/v1',
        kind,
        metadata,
        spec: {
          replicas,
          selector: { matchLabels: labels },
          template,
          ...(kind === 'StatefulSet' ? { serviceName: spec.name } : {}),
        },
        status: { replicas: 0, readyReplicas: 0, availableReplicas: 0 },
      });
      const uid = workload.metadata.uid ?? '';
      let podOwner = uid;
      if (kind === 'Deployment') {
        const hash = templateHash(template);
        const rsLabels = { ...labels, 'pod-template-hash': hash };
        const replicaSet = store.create<Workload>('replicasets', {
          apiVersion: 'apps/v1',
          kind: 'ReplicaSet',
          metadata: {
            name: `${spec.name}-${hash}`,
            namespace,
            labels: rsLabels,
            annotations: { 'deployment.kubernetes.io/revision': '1' },
            ownerReferences: [ownerReferenceTo(workload)],
          },
          spec: {
            replicas,
            selector: { matchLabels: rsLabels },
            template: { ...template, metadata: { ...template.metadata, labels: rsLabels } },
          },
          status: { replicas: 0, readyReplicas: 0, availableReplicas: 0 },
        });
        podOwner = replicaSet.metadata.uid ?? '';
      }
      const pods =
        spec.wait === false
          ? []
          : await readyPods(`${kind} ${spec.name}`, replicas, ownedBy(podOwner));
      return {
        kind,
        name: spec.name,
        namespace,
        uid,
        selector: labels,
        pods,
        object: () => store.get<Workload>(resource, namespace, spec.name),
      };
    };

    const cluster: StandInCluster = {
      url: server.url,
      kubeconfigPath,
      token,
      caPem: tls.caPem,
      namespace: 'default',
      nodeName,
      clientNetns: network.clientNetns,
      faults,
      requests,
      async addPod(spec) {
        const namespace = spec.namespace ?? 'default';
        ensureNamespace(namespace);
        const template = podTemplate(spec, spec.labels ?? { app: spec.name });
        const pod = store.create<Pod>(
          'pods',
          admitPod(
            {
              apiVersion: 'v1',
              kind: 'Pod',
              metadata: { ...template.metadata, name: spec.name, namespace },
              spec: template.spec,
              status: { phase: 'Pending' },
            },
            namespace,
          ),
        );
        if (spec.wait === false) return handleOf(pod);
        const uid = pod.metadata.uid;
        const [ready] = await readyPods(`pod ${spec.name}`, 1, (p) => p.metadata.uid === uid);
        return ready ?? handleOf(pod);
      },
      addDeployment: (spec) => addWorkload('Deployment', spec),
      addStatefulSet: (spec) => addWorkload('StatefulSet', spec),
      jobs: (namespace) => store.list<Job>('jobs', namespace),
      pods: (namespace) => store.list<Pod>('pods', namespace),
      processes: () => kubelet.processes(),
      close: closeAll,
    };
    return cluster;
  } catch (error) {
    await closeAll().catch(() => undefined);
    throw error;
  }
}

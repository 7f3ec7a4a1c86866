/**
 * The real test cluster as the Kubernetes tests use it: started once per test run (or the one a
 * developer's `npm run dev:cluster` runs), target workloads made from the images images.sh
 * builds, the API server's audit log of Job requests, and what mirrord left in the cluster (its
 * Jobs, their pods and Secrets).
 *
 * Targets run this repository's fixtures (test/fixtures, mounted read-only with a hostPath
 * volume) with the node image, so a fixture edit needs no image rebuild. Each test file works in
 * a namespace of its own, made fresh at its start and deleted with what is in it at its end.
 */
import {
  AppsV1Api,
  BatchV1Api,
  CoreV1Api,
  KubeConfig,
  RbacAuthorizationV1Api,
  type V1Container,
  type V1Job,
  type V1Pod,
  type V1PodSpec,
} from '@kubernetes/client-node';
import { readFileSync, readdirSync } from 'node:fs';
import { ensureCluster } from '../cluster/cluster.js';
import { AUDIT_LOG } from '../cluster/components.js';
import { checkRoutedLocally } from '../cluster/host.js';
import { NODE_NAME } from '../cluster/layout.js';
import { MANAGED_SELECTOR } from '../../src/platform/kube/agent-job.js';
import { FIXTURES } from './mirror-cli.js';
import { waitFor } from './wait.js';

export const NODE_IMAGE = 'mirrord.test/node:20';
export const REDIS_IMAGE = 'mirrord.test/redis:7';
/** Where targets see test/fixtures. */
export const FIXTURES_IN_POD = '/fixtures';

export interface ContainerInfo {
  name: string;
  /** As the kubelet reports it: `containerd://<64 hex>`. */
  containerId: string;
}

export interface PodInfo {
  name: string;
  namespace: string;
  ip: string;
  containers: ContainerInfo[];
}

export interface TargetContainer {
  name: string;
  /** Default: the node image. */
  image?: string;
  command: string[];
  /** The container listens here; it is Ready once a TCP connection succeeds. */
  port?: number;
}

/** Pod-level extras for a target (most tests need none). */
export type PodExtras = Partial<Pick<V1PodSpec, 'initContainers' | 'volumes'>>;

/** A node program of test/fixtures as a container command: `node /fixtures/NAME ARGS…`. */
export function fixture(name: string, args: string[] = []): string[] {
  return ['node', `${FIXTURES_IN_POD}/${name}`, ...args];
}

function container(spec: TargetContainer): V1Container {
  return {
    name: spec.name,
    image: spec.image ?? NODE_IMAGE,
    imagePullPolicy: 'Never',
    command: spec.command,
    ...(spec.port
      ? {
          ports: [{ containerPort: spec.port, name: `p${spec.port}` }],
          readinessProbe: { tcpSocket: { port: spec.port }, periodSeconds: 1 },
        }
      : {}),
    volumeMounts: [{ name: 'fixtures', mountPath: FIXTURES_IN_POD, readOnly: true }],
  };
}

function podSpec(containers: TargetContainer[], extras: PodExtras = {}): V1PodSpec {
  return {
    containers: containers.map(container),
    initContainers: extras.initContainers,
    volumes: [
      { name: 'fixtures', hostPath: { path: FIXTURES, type: 'Directory' } },
      ...(extras.volumes ?? []),
    ],
    // Targets stop at once when a test deletes them.
    terminationGracePeriodSeconds: 1,
  };
}

export interface TestCluster {
  kubeconfig: string;
  /** This test file's namespace; give it to the CLI with `-n`. */
  namespace: string;
  nodeName: string;
  core: CoreV1Api;
  apps: AppsV1Api;
  batch: BatchV1Api;
  rbac: RbacAuthorizationV1Api;
  addPod(name: string, containers: TargetContainer[], extras?: PodExtras): Promise<PodInfo>;
  addDeployment(name: string, containers: TargetContainer[], replicas?: number): Promise<PodInfo[]>;
  /** Waits until the pods labelled `app=NAME` not being deleted are `count` and all ready. */
  readyPods(name: string, count: number): Promise<PodInfo[]>;
  addStatefulSet(
    name: string,
    containers: TargetContainer[],
    replicas?: number,
  ): Promise<PodInfo[]>;
  /** mirrord's Jobs, Secrets and pods in the namespace, as `job/NAME`, `secret/NAME`, `pod/NAME`. */
  mirrordObjects(): Promise<string[]>;
  /** Each pod in the namespace on a line (phase, deletion, containers), for failure messages. */
  podStates(): Promise<string>;
  /** The audit log's Job requests so far; pass a length to get the ones after it. */
  jobRequests(since?: number): AuditEvent[];
  /** Deletes every workload, pod, Job and Service the tests made in the namespace. */
  clear(): Promise<void>;
  /** Deletes the namespace with everything in it, and waits until it is gone. */
  remove(): Promise<void>;
}

export interface AuditEvent {
  verb: string;
  requestURI: string;
  objectRef?: { name?: string; namespace?: string };
  requestObject?: Record<string, unknown>;
  responseStatus?: { code?: number };
}

/** Waits until `check` gives a value; a failing API call counts as not yet. */
function until<T>(what: string, check: () => Promise<T | undefined>, ms = 120_000): Promise<T> {
  return waitFor(what, () => check().catch(() => undefined), { ms, everyMs: 250 }) as Promise<T>;
}

function podInfo(pod: V1Pod): PodInfo | undefined {
  const ready = pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True');
  if (!ready || !pod.status?.podIP) return undefined;
  return {
    name: pod.metadata!.name!,
    namespace: pod.metadata!.namespace!,
    ip: pod.status.podIP,
    containers: (pod.status.containerStatuses ?? []).map((status) => ({
      name: status.name,
      containerId: status.containerID ?? '',
    })),
  };
}

/**
 * The running cluster, started for this test run if none runs (that takes a minute or two), with
 * a fresh namespace `name` (a leftover of a killed run is deleted first).
 */
export async function testCluster(name: string): Promise<TestCluster> {
  const NAMESPACE = name;
  const kubeconfig = await ensureCluster();
  const config = new KubeConfig();
  config.loadFromFile(kubeconfig);
  const core = config.makeApiClient(CoreV1Api);
  const apps = config.makeApiClient(AppsV1Api);
  const batch = config.makeApiClient(BatchV1Api);
  const rbac = config.makeApiClient(RbacAuthorizationV1Api);

  const gone = async (): Promise<boolean | undefined> => {
    try {
      await core.readNamespace({ name: NAMESPACE });
      return undefined;
    } catch {
      return true;
    }
  };
  const removeNamespace = async (): Promise<void> => {
    await core.deleteNamespace({ name: NAMESPACE, gracePeriodSeconds: 0 }).catch(() => undefined);
    await until(`namespace ${NAMESPACE} to go`, gone);
  };
  await removeNamespace();
  await core.createNamespace({ body: { metadata: { name: NAMESPACE } } });
  await until(`the default ServiceAccount of ${NAMESPACE}`, () =>
    core.readNamespacedServiceAccount({ name: 'default', namespace: NAMESPACE }),
  );

  const readyPods = (selector: string, count: number): Promise<PodInfo[]> =>
    until(`${count} ready pod(s) ${selector}`, async () => {
      const { items } = await core.listNamespacedPod({
        namespace: NAMESPACE,
        labelSelector: selector,
      });
      const ready = items.filter((pod) => !pod.metadata?.deletionTimestamp).map(podInfo);
      if (ready.length !== count || !ready.every(Boolean)) return undefined;
      // Tests send load to these addresses: they must lead into the pod bridge, nowhere else.
      for (const pod of ready as PodInfo[]) checkRoutedLocally(pod.ip);
      return ready as PodInfo[];
    });

  return {
    kubeconfig,
    namespace: NAMESPACE,
    nodeName: NODE_NAME,
    core,
    apps,
    batch,
    rbac,
    async addPod(name, containers, extras) {
      await core.createNamespacedPod({
        namespace: NAMESPACE,
        body: { metadata: { name, labels: { app: name } }, spec: podSpec(containers, extras) },
      });
      return (await readyPods(`app=${name}`, 1))[0]!;
    },
    async addDeployment(name, containers, replicas = 1) {
      const labels = { app: name };
      await apps.createNamespacedDeployment({
        namespace: NAMESPACE,
        body: {
          metadata: { name, labels },
          spec: {
            replicas,
            selector: { matchLabels: labels },
            template: { metadata: { labels }, spec: podSpec(containers) },
          },
        },
      });
      return readyPods(`app=${name}`, replicas);
    },
    async addStatefulSet(name, containers, replicas = 1) {
      const labels = { app: name };
      await apps.createNamespacedStatefulSet({
        namespace: NAMESPACE,
        body: {
          metadata: { name, labels },
          spec: {
            replicas,
            serviceName: name,
            selector: { matchLabels: labels },
            template: { metadata: { labels }, spec: podSpec(containers) },
          },
        },
      });
      return readyPods(`app=${name}`, replicas);
    },
    readyPods: (name, count) => readyPods(`app=${name}`, count),
    async podStates() {
      const { items } = await core.listNamespacedPod({ namespace: NAMESPACE });
      return items
        .map((pod) => {
          const deleted = pod.metadata?.deletionTimestamp;
          const containers = (pod.status?.containerStatuses ?? []).map(
            (c) => `${c.name} ${Object.keys(c.state ?? {}).join()} ${c.containerID ?? ''}`,
          );
          return [
            `pod/${pod.metadata?.name} ${pod.status?.phase}`,
            deleted ? `deleted at ${new Date(deleted).toISOString()}` : '',
            ...containers,
          ]
            .filter(Boolean)
            .join('; ');
        })
        .join('\n');
    },
    async mirrordObjects() {
      const jobs = await batch.listNamespacedJob({
        namespace: NAMESPACE,
        labelSelector: MANAGED_SELECTOR,
      });
      const secrets = await core.listNamespacedSecret({
        namespace: NAMESPACE,
        labelSelector: MANAGED_SELECTOR,
      });
      const pods = await core.listNamespacedPod({
        namespace: NAMESPACE,
        labelSelector: MANAGED_SELECTOR,
      });
      return [
        ...jobs.items.map((job) => `job/${job.metadata!.name}`),
        ...secrets.items.map((secret) => `secret/${secret.metadata!.name}`),
        ...pods.items.map((pod) => `pod/${pod.metadata!.name}`),
      ];
    },
    jobRequests(since = 0) {
      let text = '';
      try {
        text = readFileSync(AUDIT_LOG, 'utf8');
      } catch {
        // No Job request yet.
      }
      // The API server may be part-way through writing the last line: only whole lines count.
      return text
        .slice(0, text.lastIndexOf('\n') + 1)
        .split('\n')
        .filter(Boolean)
        .map((line) => JSON.parse(line) as AuditEvent)
        .filter((event) => event.objectRef?.namespace === NAMESPACE)
        .slice(since);
    },
    async clear() {
      const namespace = NAMESPACE;
      await apps.deleteCollectionNamespacedDeployment({ namespace });
      await apps.deleteCollectionNamespacedStatefulSet({ namespace });
      await batch.deleteCollectionNamespacedJob({ namespace, propagationPolicy: 'Background' });
      await core.deleteCollectionNamespacedPod({ namespace, gracePeriodSeconds: 0 });
      const services = await core.listNamespacedService({ namespace });
      for (const service of services.items) {
        if (service.metadata?.name !== 'kubernetes') {
          await core.deleteNamespacedService({ name: service.metadata!.name!, namespace });
        }
      }
      await until('the namespace to be empty of pods', async () => {
        const { items } = await core.listNamespacedPod({ namespace });
        return items.length === 0 ? true : undefined;
      });
    },
    remove: removeNamespace,
  };
}

/** The created Job's body from an audit event (the request as the API server received it). */
export function requestedJob(event: AuditEvent): V1Job {
  return event.requestObject as V1Job;
}

/** Pids of the processes whose /proc/PID/`file` contains `text` (gone ones are skipped). */
function processesWith(file: 'cgroup' | 'cmdline', text: string): number[] {
  return readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/${file}`, 'utf8').includes(text);
      } catch {
        return false;
      }
    })
    .map(Number);
}

/**
 * Pids of the processes of a container (`containerd://<hex>` or the bare hex), found as the
 * agent finds them: by their cgroup. Containers' processes are visible from the host.
 */
export function containerProcesses(containerId: string): number[] {
  return processesWith('cgroup', containerId.replace(/^[a-z-]+:\/\//, ''));
}

/** Pids of agent processes on this machine (containers' processes are visible from the host). */
export function agentProcesses(): number[] {
  return processesWith('cmdline', '\0agent\0--container-id\0');
}

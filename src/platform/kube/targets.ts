import type { V1Container, V1LabelSelector, V1Pod } from '@kubernetes/client-node';
import { apiCall, statusCodeOf, kubeApiError, type ApiAction } from './api-errors.js';
import { KubeError, type KubeAccess } from './kubeconfig.js';
import type { TargetKind } from './target-kinds.js';

/** What the user asked to mirror: `pod/NAME`, `deployment/NAME` or `statefulset/NAME`. */
export interface KubeTarget {
  kind: TargetKind;
  name: string;
  namespace: string;
  /** --container; default: the first container that is not a known mesh sidecar. */
  container?: string;
}

export interface ContainerPort {
  port: number;
  name?: string;
  protocol: string;
}

/** The pod a KubeTarget stands for now: the running container the agent taps, and where. */
export interface MirroredPod {
  ref: KubeTarget;
  namespace: string;
  pod: string;
  podIP?: string;
  node: string;
  container: string;
  /** As the runtime reports it, e.g. `containerd://4f1c…`: the agent finds the PID from it. */
  containerId: string;
  ports: ContainerPort[];
}

/**
 * Containers a service mesh injects next to the app: tapping them would mirror the mesh's
 * plumbing, not the app, so they are never the default container.
 */
export const MESH_SIDECARS = new Set([
  'istio-proxy',
  'linkerd-proxy',
  'kuma-sidecar',
  'envoy-sidecar',
  'consul-dataplane',
  'consul-connect-envoy-sidecar',
  'aws-appmesh-envoy',
  'osm-envoy',
  'cilium-envoy',
]);

/** The container mirrored when none is named: the first that is not a mesh sidecar. */
export function defaultContainer(names: string[]): string | undefined {
  return names.find((name) => !MESH_SIDECARS.has(name)) ?? names[0];
}

export function portsOf(container: V1Container | undefined): ContainerPort[] {
  return (container?.ports ?? []).map((port) => ({
    port: port.containerPort,
    ...(port.name ? { name: port.name } : {}),
    protocol: port.protocol ?? 'TCP',
  }));
}

/** `pod default/api-7f9 (container api)`, or with the workload it was picked from. */
export function describePod(target: MirroredPod): string {
  const pod = `pod ${target.namespace}/${target.pod}`;
  const of = target.ref.kind === 'pod' ? '' : ` of ${target.ref.kind}/${target.ref.name}`;
  return `${pod}${of} (container ${target.container})`;
}

/** A label selector in the query syntax of `labelSelector=`. */
export function selectorQuery(selector: V1LabelSelector | undefined): string {
  const terms = Object.entries(selector?.matchLabels ?? {}).map(
    ([key, value]) => `${key}=${value}`,
  );
  for (const { key, operator, values = [] } of selector?.matchExpressions ?? []) {
    if (operator === 'In') terms.push(`${key} in (${values.join(',')})`);
    else if (operator === 'NotIn') terms.push(`${key} notin (${values.join(',')})`);
    else if (operator === 'Exists') terms.push(key);
    else if (operator === 'DoesNotExist') terms.push(`!${key}`);
  }
  return terms.join(',');
}

function isReady(pod: V1Pod): boolean {
  return Boolean(
    pod.status?.phase === 'Running' &&
    !pod.metadata?.deletionTimestamp &&
    pod.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'),
  );
}

/** Why a pod cannot be mirrored, in a few words (e.g. `Pending: ContainerCreating`). */
function podState(pod: V1Pod): string {
  if (pod.metadata?.deletionTimestamp) return 'terminating';
  const phase = pod.status?.phase ?? 'Unknown';
  const waiting = pod.status?.containerStatuses?.find((s) => s.state?.waiting)?.state?.waiting;
  if (waiting?.reason) return `${phase}: ${waiting.reason}`;
  if (phase === 'Running' && !isReady(pod)) return 'Running but not ready';
  return phase;
}

function notFound(access: KubeAccess, action: ApiAction, kind: string) {
  return (error: unknown): never => {
    if (statusCodeOf(error) === 404) {
      throw new KubeError(
        `${kind} "${action.name}" not found in namespace ${action.namespace}: check the name and namespace (mirrord ls lists what can be mirrored)`,
      );
    }
    throw kubeApiError(error, action, access);
  };
}

async function readPod(access: KubeAccess, namespace: string, name: string): Promise<V1Pod> {
  const action: ApiAction = { verb: 'get', resource: 'pods', namespace, name };
  return access.core.readNamespacedPod({ name, namespace }).catch(notFound(access, action, 'pod'));
}

/** The newest running, ready pod of a deployment or statefulset. */
async function podOfWorkload(access: KubeAccess, ref: KubeTarget): Promise<V1Pod> {
  const { namespace, name } = ref;
  const resource = `${ref.kind}s.apps`;
  const action: ApiAction = { verb: 'get', resource, namespace, name };
  const workload =
    ref.kind === 'deployment'
      ? await access.apps
          .readNamespacedDeployment({ name, namespace })
          .catch(notFound(access, action, ref.kind))
      : await access.apps
          .readNamespacedStatefulSet({ name, namespace })
          .catch(notFound(access, action, ref.kind));
  const labelSelector = selectorQuery(workload.spec?.selector);
  const pods = await apiCall(access, { verb: 'list', resource: 'pods', namespace }, () =>
    access.core.listNamespacedPod({ namespace, labelSelector }),
  );
  const ready = pods.items
    .filter(isReady)
    .sort(
      (a, b) =>
        (b.metadata?.creationTimestamp?.getTime() ?? 0) -
        (a.metadata?.creationTimestamp?.getTime() ?? 0),
    );
  const newest = ready[0];
  if (newest) return newest;
  const states = pods.items
    .slice(0, 3)
    .map((pod) => `${pod.metadata?.name} ${podState(pod)}`)
    .join(', ');
  throw new KubeError(
    `${ref.kind} ${namespace}/${name} has no running, ready pod (${states ? `pods: ${states}` : 'it has no pods'}): wait for it to become ready, or pick another target`,
  );
}

/**
 * Resolves a target to the running container the agent will tap: the pod (for a workload, its
 * newest ready pod), the container, its runtime ID, its node and its ports. Every failure is
 * one line that says what to do.
 */
export async function pickPod(access: KubeAccess, ref: KubeTarget): Promise<MirroredPod> {
  const pod =
    ref.kind === 'pod'
      ? await readPod(access, ref.namespace, ref.name)
      : await podOfWorkload(access, ref);
  const podName = pod.metadata?.name ?? ref.name;
  const where = `pod ${ref.namespace}/${podName}`;
  if (pod.status?.phase !== 'Running' || pod.metadata?.deletionTimestamp) {
    throw new KubeError(`${where} is not running (${podState(pod)}): mirror a running pod`);
  }
  const containers = pod.spec?.containers ?? [];
  const names = containers.map((container) => container.name);
  const containerName = ref.container ?? defaultContainer(names);
  const container = containers.find((candidate) => candidate.name === containerName);
  if (!container) {
    throw new KubeError(
      `container "${ref.container}" not found in ${where} (its containers: ${names.join(', ')}): give one of them with --container`,
    );
  }
  const status = pod.status.containerStatuses?.find((s) => s.name === container.name);
  if (!status?.state?.running || !status.containerID) {
    const waiting = status?.state?.waiting?.reason ?? status?.state?.terminated?.reason;
    throw new KubeError(
      `container ${container.name} of ${where} is not running${waiting ? ` (${waiting})` : ''}: mirror a running container`,
    );
  }
  const node = pod.spec?.nodeName;
  if (!node) throw new KubeError(`${where} is not scheduled on a node yet`);
  return {
    ref,
    namespace: ref.namespace,
    pod: podName,
    ...(pod.status.podIP ? { podIP: pod.status.podIP } : {}),
    node,
    container: container.name,
    containerId: status.containerID,
    ports: portsOf(container),
  };
}

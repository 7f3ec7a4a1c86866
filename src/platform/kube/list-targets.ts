import type { V1Container, V1Pod } from '@kubernetes/client-node';
import { apiCall, statusCodeOf, kubeApiError } from './api-errors.js';
import { LABELS } from './agent-job.js';
import type { KubeAccess } from './kubeconfig.js';
import type { TargetKind } from './target-kinds.js';
import { MESH_SIDECARS, defaultContainer, portsOf, type ContainerPort } from './targets.js';

export interface ListedContainer {
  name: string;
  ports: ContainerPort[];
  /** A mesh sidecar: never mirrored unless named with --container. */
  sidecar: boolean;
  /** The one mirrored when no --container is given. */
  default: boolean;
}

/** Something `mirrord mirror` can be pointed at, as `mirrord ls` shows it. */
export interface ListedTarget {
  /** As the flags take it: `pod/NAME`, `deployment/NAME`, `statefulset/NAME`. */
  target: string;
  kind: TargetKind;
  name: string;
  namespace: string;
  /** Ready containers of a pod, or ready replicas of a workload: `READY/ALL`. */
  ready: string;
  /** A running, ready pod to mirror is there now. */
  mirrorable: boolean;
  containers: ListedContainer[];
}

export interface TargetList {
  targets: ListedTarget[];
  /** Kinds that could not be listed (RBAC), as one line each. */
  notes: string[];
}

function containersOf(containers: V1Container[] = []): ListedContainer[] {
  const chosen = defaultContainer(containers.map((container) => container.name));
  return containers.map((container) => ({
    name: container.name,
    ports: portsOf(container),
    sidecar: MESH_SIDECARS.has(container.name),
    default: container.name === chosen,
  }));
}

function podTarget(pod: V1Pod): ListedTarget {
  const statuses = pod.status?.containerStatuses ?? [];
  const readyCount = statuses.filter((status) => status.ready).length;
  const ready = pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True');
  const name = pod.metadata?.name ?? '';
  return {
    target: `pod/${name}`,
    kind: 'pod',
    name,
    namespace: pod.metadata?.namespace ?? '',
    ready: `${readyCount}/${pod.spec?.containers.length ?? 0}`,
    mirrorable: Boolean(ready),
    containers: containersOf(pod.spec?.containers),
  };
}

function workloadTarget(
  kind: 'deployment' | 'statefulset',
  workload: {
    metadata?: { name?: string; namespace?: string };
    spec?: { replicas?: number; template: { spec?: { containers: V1Container[] } } };
    status?: { readyReplicas?: number };
  },
): ListedTarget {
  const name = workload.metadata?.name ?? '';
  const readyReplicas = workload.status?.readyReplicas ?? 0;
  return {
    target: `${kind}/${name}`,
    kind,
    name,
    namespace: workload.metadata?.namespace ?? '',
    ready: `${readyReplicas}/${workload.spec?.replicas ?? 1}`,
    mirrorable: readyReplicas > 0,
    containers: containersOf(workload.spec?.template.spec?.containers),
  };
}

/**
 * The targets in a namespace (or all): running pods (not mirrord's own agents), deployments
 * and statefulsets, with their containers and ports. Pods must be listable; a workload kind
 * RBAC hides is skipped with a note.
 */
export async function listTargets(
  access: KubeAccess,
  options: { allNamespaces: boolean },
): Promise<TargetList> {
  const namespace = options.allNamespaces ? undefined : access.namespace;
  const where = namespace ? { namespace } : {};
  const notes: string[] = [];
  const optional = async <T>(resource: string, list: () => Promise<{ items: T[] }>) => {
    try {
      return (await list()).items;
    } catch (error) {
      if (statusCodeOf(error) !== 403)
        throw kubeApiError(error, { verb: 'list', resource, ...where }, access);
      notes.push(
        `${kubeApiError(error, { verb: 'list', resource, ...where }, access).message} (not shown)`,
      );
      return [];
    }
  };
  const pods = await apiCall(access, { verb: 'list', resource: 'pods', ...where }, () =>
    namespace
      ? access.core.listNamespacedPod({ namespace })
      : access.core.listPodForAllNamespaces(),
  );
  const deployments = await optional('deployments.apps', () =>
    namespace
      ? access.apps.listNamespacedDeployment({ namespace })
      : access.apps.listDeploymentForAllNamespaces(),
  );
  const statefulSets = await optional('statefulsets.apps', () =>
    namespace
      ? access.apps.listNamespacedStatefulSet({ namespace })
      : access.apps.listStatefulSetForAllNamespaces(),
  );
  const byName = (a: ListedTarget, b: ListedTarget) =>
    a.namespace.localeCompare(b.namespace) || a.name.localeCompare(b.name);
  const running = pods.items.filter(
    (pod) =>
      pod.status?.phase === 'Running' &&
      !pod.metadata?.deletionTimestamp &&
      pod.metadata?.labels?.[LABELS.managedBy] !== 'mirrord',
  );
  return {
    targets: [
      ...deployments.map((d) => workloadTarget('deployment', d)).sort(byName),
      ...statefulSets.map((s) => workloadTarget('statefulset', s)).sort(byName),
      ...running.map(podTarget).sort(byName),
    ],
    notes,
  };
}

function describeContainer(container: ListedContainer): string {
  const ports = container.ports.map((p) => (p.name ? `${p.port}/${p.name}` : String(p.port)));
  const portText = ports.length > 0 ? ` (${ports.join(', ')})` : '';
  return `${container.name}${portText}${container.sidecar ? ' [mesh sidecar]' : ''}`;
}

/** The human table of `mirrord ls`. */
export function formatTargets(targets: ListedTarget[]): string {
  const rows = [
    ['TARGET', 'NAMESPACE', 'READY', 'CONTAINERS (PORTS)'],
    ...targets.map((t) => [
      t.target,
      t.namespace,
      t.ready,
      t.containers.map(describeContainer).join(', '),
    ]),
  ];
  const widths = [0, 1, 2].map((column) => Math.max(...rows.map((row) => row[column]!.length)));
  return rows
    .map((row) =>
      row
        .map((cell, column) => cell.padEnd(widths[column] ?? 0))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

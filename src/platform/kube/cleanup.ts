import type { V1Job, V1Pod } from '@kubernetes/client-node';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { apiCall, kubeApiError, statusCodeOf } from './api-errors.js';
import { ANNOTATIONS, LABELS, MANAGED_SELECTOR } from './agent-job.js';
import type { KubeAccess } from './kubeconfig.js';

/**
 * An agent that never got running this long after its Job was made is a leftover: the CLI
 * gives up (and deletes the Job) after its startup timeout, which is far shorter, so only a
 * CLI that died while waiting leaves one behind.
 */
export const STUCK_AFTER_MS = 10 * 60 * 1000;

export interface CleanupEntry {
  kind: 'job' | 'pod';
  namespace: string;
  name: string;
  session?: string;
  reason: string;
}

export interface CleanupResult {
  removed: CleanupEntry[];
  kept: CleanupEntry[];
}

export interface CleanupOptions {
  allNamespaces: boolean;
  /** Remove every mirrord Job, also those of sessions that may still be running. */
  all: boolean;
  now?: number;
  host?: string;
  /** Whether a CLI process of this host is still running (injectable for other platforms). */
  cliAlive?: (pid: number) => boolean;
}

/** A mirrord CLI still runs as `pid` here: the pid exists and is a node running mirrord. */
function localCliAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('mirror');
  } catch {
    // No /proc (not Linux): the pid exists, which is all we can tell.
    return true;
  }
}

function finished(job: V1Job): string | undefined {
  const condition = job.status?.conditions?.find(
    (c) => (c.type === 'Complete' || c.type === 'Failed') && c.status === 'True',
  );
  if (condition) return condition.type;
  if ((job.status?.succeeded ?? 0) > 0) return 'Complete';
  if ((job.status?.failed ?? 0) > 0) return 'Failed';
  return undefined;
}

/**
 * Why a mirrord Job is a leftover, or undefined while its session may still be running.
 *
 * A session is over when its Job finished (the agent exits when its session ends, or when
 * none arrives within its idle timeout), when the CLI that made it is gone (known only on the
 * host that ran it: the Job carries that host and pid), or when its agent never started long
 * after the CLI would have given up. A running agent on a Job made elsewhere is kept: its
 * session may be alive, and the agent ends by itself when it is not.
 */
function leftoverReason(
  job: V1Job,
  pods: V1Pod[],
  options: Required<Pick<CleanupOptions, 'all' | 'now' | 'host' | 'cliAlive'>>,
): { remove: boolean; reason: string } {
  if (options.all) return { remove: true, reason: 'removed with --all' };
  const end = finished(job);
  if (end) return { remove: true, reason: `its agent finished (${end})` };
  const [cliHost, cliPid] = (job.metadata?.annotations?.[ANNOTATIONS.cli] ?? '').split('/');
  const pid = Number(cliPid);
  if (cliHost === options.host && Number.isInteger(pid) && pid > 0) {
    return options.cliAlive(pid)
      ? { remove: false, reason: `its CLI (pid ${pid}) is still running` }
      : { remove: true, reason: `its CLI (pid ${pid} on this host) is gone` };
  }
  const created = job.metadata?.creationTimestamp?.getTime() ?? options.now;
  const running = pods.some((pod) => pod.status?.phase === 'Running');
  if (!running && options.now - created > STUCK_AFTER_MS) {
    const minutes = Math.round((options.now - created) / 60_000);
    return { remove: true, reason: `its agent never started (created ${minutes} min ago)` };
  }
  const where = cliHost ? ` on ${cliHost}` : '';
  return {
    remove: false,
    reason: `its session may still be running${where} (--all removes it anyway)`,
  };
}

/** Removes the Jobs (and orphaned pods) of mirrord sessions that are over, and says why. */
export async function cleanupLeftovers(
  access: KubeAccess,
  options: CleanupOptions,
): Promise<CleanupResult> {
  const namespace = options.allNamespaces ? undefined : access.namespace;
  const where = namespace ? { namespace } : {};
  const labelSelector = MANAGED_SELECTOR;
  const jobs = await apiCall(access, { verb: 'list', resource: 'jobs.batch', ...where }, () =>
    namespace
      ? access.batch.listNamespacedJob({ namespace, labelSelector })
      : access.batch.listJobForAllNamespaces({ labelSelector }),
  );
  const pods = await apiCall(access, { verb: 'list', resource: 'pods', ...where }, () =>
    namespace
      ? access.core.listNamespacedPod({ namespace, labelSelector })
      : access.core.listPodForAllNamespaces({ labelSelector }),
  );
  const decide = {
    all: options.all,
    now: options.now ?? Date.now(),
    host: options.host ?? hostname(),
    cliAlive: options.cliAlive ?? localCliAlive,
  };
  const result: CleanupResult = { removed: [], kept: [] };
  const sessionOf = (object: V1Job | V1Pod) => object.metadata?.labels?.[LABELS.session];
  const remove = async (entry: CleanupEntry, request: () => Promise<unknown>) => {
    try {
      await request();
    } catch (error) {
      if (statusCodeOf(error) !== 404) {
        const resource = entry.kind === 'job' ? 'jobs.batch' : 'pods';
        throw kubeApiError(error, { verb: 'delete', resource, ...entry }, access);
      }
    }
    result.removed.push(entry);
  };

  for (const job of jobs.items) {
    const session = sessionOf(job);
    const entry = {
      kind: 'job' as const,
      namespace: job.metadata?.namespace ?? '',
      name: job.metadata?.name ?? '',
      ...(session ? { session } : {}),
    };
    const own = pods.items.filter(
      (pod) => sessionOf(pod) === session && pod.metadata?.namespace === entry.namespace,
    );
    const { remove: over, reason } = leftoverReason(job, own, decide);
    if (!over) {
      result.kept.push({ ...entry, reason });
      continue;
    }
    await remove({ ...entry, reason }, () =>
      access.batch.deleteNamespacedJob({
        name: entry.name,
        namespace: entry.namespace,
        propagationPolicy: 'Background',
      }),
    );
  }
  // Agent pods whose Job is gone (deleted with propagation Orphan, say) end nothing by themselves.
  const jobKeys = new Set(jobs.items.map((job) => `${job.metadata?.namespace}/${sessionOf(job)}`));
  for (const pod of pods.items) {
    const session = sessionOf(pod);
    if (jobKeys.has(`${pod.metadata?.namespace}/${session}`) || pod.metadata?.deletionTimestamp) {
      continue;
    }
    const entry = {
      kind: 'pod' as const,
      namespace: pod.metadata?.namespace ?? '',
      name: pod.metadata?.name ?? '',
      ...(session ? { session } : {}),
      reason: 'its Job is gone',
    };
    await remove(entry, () =>
      access.core.deleteNamespacedPod({ name: entry.name, namespace: entry.namespace }),
    );
  }
  return result;
}

/** The human lines of `mirrord cleanup`. */
export function formatCleanup(result: CleanupResult, scope: string): string {
  const lines = [
    ...result.removed.map((e) => `removed ${e.kind} ${e.namespace}/${e.name}: ${e.reason}`),
    ...result.kept.map((e) => `kept ${e.kind} ${e.namespace}/${e.name}: ${e.reason}`),
  ];
  if (result.removed.length === 0) lines.unshift(`nothing to remove ${scope}`);
  return lines.join('\n');
}

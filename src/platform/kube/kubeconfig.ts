import {
  AppsV1Api,
  BatchV1Api,
  CoreV1Api,
  KubeConfig,
  ServerConfiguration,
  VersionApi,
  createConfiguration,
  type Cluster,
  type Middleware,
  type RequestContext,
  type ResponseContext,
  type Context,
  type User,
} from '@kubernetes/client-node';
import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';

/** A Kubernetes problem the user can act on; its message is the one line they see. */
export class KubeError extends Error {}

export interface KubeAccessOptions {
  /** --kubeconfig: this file only, as with kubectl. */
  kubeconfig?: string;
  /** --context: instead of the kubeconfig's current context. */
  context?: string;
  /** -n/--namespace: instead of the context's namespace. */
  namespace?: string;
  /** Longest wait for one ordinary API request (not watches or log streams). */
  requestTimeoutMs?: number;
}

/** One cluster as the user's kubeconfig reaches it, with the API clients this CLI uses. */
export interface KubeAccess {
  config: KubeConfig;
  context: string;
  server: string;
  namespace: string;
  requestTimeoutMs: number;
  core: CoreV1Api;
  apps: AppsV1Api;
  batch: BatchV1Api;
  version: VersionApi;
}

export const DEFAULT_REQUEST_TIMEOUT_MS = 20_000;

/** kubectl's order: --kubeconfig, else every file of KUBECONFIG, else ~/.kube/config. */
function kubeconfigFiles(explicit: string | undefined): { files: string[]; looked: string } {
  if (explicit) {
    if (!existsSync(explicit)) {
      throw new KubeError(`kubeconfig ${explicit} (from --kubeconfig) does not exist`);
    }
    return { files: [explicit], looked: explicit };
  }
  const fromEnv = (process.env.KUBECONFIG ?? '').split(delimiter).filter(Boolean);
  if (fromEnv.length > 0) {
    // kubectl skips the files of KUBECONFIG that do not exist.
    return {
      files: fromEnv.filter((file) => existsSync(file)),
      looked: `KUBECONFIG (${fromEnv.join(delimiter)})`,
    };
  }
  const home = join(process.env.HOME || homedir(), '.kube', 'config');
  return { files: existsSync(home) ? [home] : [], looked: home };
}

function loadFile(file: string): KubeConfig {
  const config = new KubeConfig();
  try {
    config.loadFromFile(file);
  } catch (error) {
    const reason = (error as Error).message.split('\n')[0];
    throw new KubeError(`kubeconfig ${file} cannot be read: ${reason}`);
  }
  return config;
}

/**
 * Merges files as kubectl does: the first file that names a cluster, user or context wins for
 * it, and the first file that sets a current context sets it. (client-node's own merge throws
 * on a name defined twice and lets the last current-context win.)
 */
function mergeFiles(files: string[]): KubeConfig {
  const clusters = new Map<string, Cluster>();
  const users = new Map<string, User>();
  const contexts = new Map<string, Context>();
  let currentContext = '';
  for (const file of files) {
    const config = loadFile(file);
    for (const cluster of config.getClusters()) {
      if (!clusters.has(cluster.name)) clusters.set(cluster.name, cluster);
    }
    for (const user of config.getUsers()) if (!users.has(user.name)) users.set(user.name, user);
    for (const context of config.getContexts()) {
      if (!contexts.has(context.name)) contexts.set(context.name, context);
    }
    currentContext ||= config.getCurrentContext() ?? '';
  }
  const merged = new KubeConfig();
  merged.loadFromOptions({
    clusters: [...clusters.values()],
    users: [...users.values()],
    contexts: [...contexts.values()],
    currentContext,
  });
  return merged;
}

/** Aborts every ordinary request that takes longer than `ms`: a blackholed server must not hang us. */
function requestTimeout(ms: number): Middleware {
  return {
    pre: async (context: RequestContext) => {
      context.setSignal(AbortSignal.timeout(ms));
      return context;
    },
    post: async (response: ResponseContext) => response,
  };
}

/**
 * Loads the kubeconfig as kubectl does and picks the context and namespace. Throws a one-line
 * KubeError when there is no kubeconfig (saying where it looked) or the context is unknown.
 */
export function loadKubeAccess(options: KubeAccessOptions = {}): KubeAccess {
  const { files, looked } = kubeconfigFiles(options.kubeconfig);
  let config: KubeConfig;
  if (files.length > 0) {
    config = mergeFiles(files);
  } else if (process.env.KUBERNETES_SERVICE_HOST && !options.kubeconfig) {
    // Inside a pod, as kubectl does: the service account.
    config = new KubeConfig();
    config.loadFromCluster();
  } else {
    throw new KubeError(
      `no kubeconfig found (looked in ${looked}): give --kubeconfig FILE, set KUBECONFIG, or create ~/.kube/config (e.g. kind, k3d or minikube do)`,
    );
  }
  const known = config.getContexts().map((context) => context.name);
  const contextName = options.context ?? config.getCurrentContext();
  if (!contextName) {
    throw new KubeError(
      `the kubeconfig sets no current context: give --context (known: ${known.join(', ') || 'none'})`,
    );
  }
  const context = config.getContextObject(contextName);
  if (!context) {
    throw new KubeError(
      `context "${contextName}" is not in the kubeconfig (known: ${known.join(', ') || 'none'})`,
    );
  }
  config.setCurrentContext(contextName);
  const cluster = config.getCurrentCluster();
  if (!cluster) {
    throw new KubeError(
      `context "${contextName}" names cluster "${context.cluster}", which the kubeconfig does not define`,
    );
  }
  const requestTimeoutMs = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  const api = createConfiguration({
    baseServer: new ServerConfiguration(cluster.server, {}),
    authMethods: { default: config },
    promiseMiddleware: [requestTimeout(requestTimeoutMs)],
  });
  return {
    config,
    context: contextName,
    server: cluster.server,
    namespace: options.namespace || context.namespace || 'default',
    requestTimeoutMs,
    core: new CoreV1Api(api),
    apps: new AppsV1Api(api),
    batch: new BatchV1Api(api),
    version: new VersionApi(api),
  };
}

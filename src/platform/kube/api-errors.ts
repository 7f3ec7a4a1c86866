import { KubeError, type KubeAccess } from './kubeconfig.js';

/** What the CLI was doing when a request failed, in RBAC terms (verb on resource). */
export interface ApiAction {
  verb: 'get' | 'list' | 'watch' | 'create' | 'delete';
  /** As RBAC names it: `pods`, `pods/log`, `jobs.batch`, `deployments.apps`. */
  resource: string;
  namespace?: string;
  /** The object, when the request was about one. */
  name?: string;
}

/** The HTTP status of a failed API request, when the server answered one. */
export function statusCodeOf(error: unknown): number | undefined {
  const { code, statusCode } = (error ?? {}) as { code?: unknown; statusCode?: unknown };
  if (typeof code === 'number') return code;
  if (typeof statusCode === 'number') return statusCode;
  return undefined;
}

/** The `message` of the `Status` object the server sent with an error, if it sent one. */
export function statusMessageOf(error: unknown): string | undefined {
  const body = (error as { body?: unknown } | undefined)?.body;
  let status: unknown = body;
  if (typeof body === 'string') {
    try {
      status = JSON.parse(body);
    } catch {
      return body.trim() || undefined;
    }
  }
  const message = (status as { message?: unknown } | undefined)?.message;
  return typeof message === 'string' && message ? message : undefined;
}

const TLS_CODE =
  /^(ERR_TLS_|ERR_SSL_|EPROTO$|CERT_|DEPTH_ZERO_SELF_SIGNED_CERT$|SELF_SIGNED_CERT_IN_CHAIN$|UNABLE_TO_)/;

/** Why a request got no answer (network, TLS, timeout), or undefined when the server answered. */
function unreachableReason(error: unknown, timeoutMs: number): string | undefined {
  const { type, code, name, message } = (error ?? {}) as {
    type?: string;
    code?: unknown;
    name?: string;
    message?: string;
  };
  if (type === 'aborted' || name === 'AbortError' || name === 'TimeoutError') {
    return `no answer within ${Math.round(timeoutMs / 1000)} s`;
  }
  if (typeof code !== 'string') return undefined;
  if (TLS_CODE.test(code)) {
    const reason = message?.replace(/^request to \S+ failed, reason: /, '') ?? code;
    return `TLS failed (${reason}): check the cluster's certificate-authority (and tls-server-name) in the kubeconfig`;
  }
  const reasons: Record<string, string> = {
    ECONNREFUSED: 'connection refused',
    ECONNRESET: 'connection reset',
    ETIMEDOUT: 'connection timed out',
    ENOTFOUND: 'host not found',
    EAI_AGAIN: 'host name lookup failed',
    EHOSTUNREACH: 'host unreachable',
    ENETUNREACH: 'network unreachable',
  };
  const reason = reasons[code];
  return reason && `${reason}: is the cluster running, and is this the right context?`;
}

/**
 * The verb and resource an RBAC denial names, in the form a Role takes them (`pods/log`,
 * `jobs.batch`), from the message of the API server's 403: `… cannot get resource "pods/log" in
 * API group "" in the namespace "default"`.
 */
function deniedPermission(
  message: string | undefined,
): { verb: string; resource: string } | undefined {
  const match = /cannot (\S+) resource "([^"]+)"(?: in API group "([^"]*)")?/.exec(message ?? '');
  if (!match) return undefined;
  const [, verb = '', resource = '', group = ''] = match;
  if (!group) return { verb, resource };
  const [base, subresource] = resource.split('/');
  return { verb, resource: `${base}.${group}${subresource ? `/${subresource}` : ''}` };
}

/**
 * Turns a failed API request into the one line the user reads: which verb on which resource
 * RBAC refused, that the server cannot be reached (naming it), or what the server said.
 */
export function kubeApiError(
  error: unknown,
  action: ApiAction,
  access: Pick<KubeAccess, 'server' | 'context' | 'requestTimeoutMs'>,
): KubeError {
  if (error instanceof KubeError) return error;
  const unreachable = unreachableReason(error, access.requestTimeoutMs);
  if (unreachable) {
    return new KubeError(
      `cannot reach the Kubernetes API server ${access.server} (context "${access.context}"): ${unreachable}`,
    );
  }
  const where = action.namespace ? ` in namespace ${action.namespace}` : '';
  const code = statusCodeOf(error);
  const said = statusMessageOf(error);
  if (code === 403) {
    const user = /User "([^"]*)"/.exec(said ?? '')?.[1];
    const as = user ? ` (as ${user})` : '';
    // The verb RBAC checked is the server's to say: a WebSocket port-forward is a GET, so 1.34
    // checks `get pods/portforward` where the CLI would guess `create` (as for SPDY's POST).
    const denied = deniedPermission(said) ?? action;
    return new KubeError(
      `not allowed to ${denied.verb} ${denied.resource}${where}${as}: ask your cluster admin for RBAC permission`,
    );
  }
  if (code === 401) {
    return new KubeError(
      `the API server ${access.server} rejected the credentials of context "${access.context}" (401 Unauthorized): log in again or refresh the kubeconfig`,
    );
  }
  const object = action.name ? ` ${action.name}` : '';
  const detail = said ?? (code ? `HTTP ${code}` : ((error as Error)?.message ?? String(error)));
  return new KubeError(
    `${action.verb} ${action.resource}${object}${where} failed: ${detail.split('\n')[0]}`,
  );
}

/** Runs one API request and translates its failure (see kubeApiError). */
export async function apiCall<T>(
  access: Pick<KubeAccess, 'server' | 'context' | 'requestTimeoutMs'>,
  action: ApiAction,
  request: () => Promise<T>,
): Promise<T> {
  try {
    return await request();
  } catch (error) {
    throw kubeApiError(error, action, access);
  }
}

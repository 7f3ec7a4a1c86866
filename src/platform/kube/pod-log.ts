import http from 'node:http';
import https from 'node:https';
import { createInterface } from 'node:readline';
import { apiCall, kubeApiError, type ApiAction } from './api-errors.js';
import type { KubeAccess } from './kubeconfig.js';

export interface LogSource {
  namespace: string;
  pod: string;
  container: string;
}

/**
 * Follows a container's log (`pods/log?follow=true`) and hands each line to `onLine`; resolves
 * when the server ends the stream or `signal` aborts it. Written on node:https rather than
 * client-node's Log, which loses the server's error and, when aborted, emits an error on a
 * stream nobody listens to (an uncaught exception).
 */
export async function followPodLog(
  access: KubeAccess,
  target: LogSource,
  onLine: (line: string) => void,
  signal: AbortSignal,
): Promise<void> {
  const action: ApiAction = {
    verb: 'get',
    resource: 'pods/log',
    namespace: target.namespace,
    name: target.pod,
  };
  const url = new URL(
    `${access.server}/api/v1/namespaces/${encodeURIComponent(target.namespace)}/pods/${encodeURIComponent(target.pod)}/log`,
  );
  url.searchParams.set('container', target.container);
  url.searchParams.set('follow', 'true');
  const options: https.RequestOptions = { method: 'GET', headers: {} };
  await access.config.applyToHTTPSOptions(options);
  if (signal.aborted) return;
  const client = url.protocol === 'http:' ? http : https;
  await new Promise<void>((resolve, reject) => {
    const request = client.request(url, options, (response) => {
      if (response.statusCode !== 200) {
        let body = '';
        response.setEncoding('utf8');
        response.on('data', (chunk: string) => (body += chunk));
        response.on('end', () =>
          reject(kubeApiError({ code: response.statusCode, body }, action, access)),
        );
        response.on('error', () =>
          reject(kubeApiError({ code: response.statusCode }, action, access)),
        );
        return;
      }
      const lines = createInterface({ input: response });
      lines.on('line', onLine);
      lines.on('close', () => resolve());
      // readline passes its input's errors on; an aborted or cut stream is just its end here.
      lines.on('error', () => resolve());
      // A cut connection ends the stream too; the caller decides whether to follow again.
      response.on('error', () => resolve());
      response.on('close', () => resolve());
    });
    const abort = (): void => {
      request.destroy();
      resolve();
    };
    signal.addEventListener('abort', abort, { once: true });
    request.on('error', (error) => {
      signal.removeEventListener('abort', abort);
      if (signal.aborted) resolve();
      else reject(kubeApiError(error, action, access));
    });
    request.on('close', () => signal.removeEventListener('abort', abort));
    request.end();
  });
}

/** The last `count` lines of a container's log (empty when the pod is already gone). */
export async function podLogTail(
  access: KubeAccess,
  target: LogSource,
  count: number,
): Promise<string[]> {
  const action: ApiAction = {
    verb: 'get',
    resource: 'pods/log',
    namespace: target.namespace,
    name: target.pod,
  };
  const text = await apiCall(access, action, () =>
    access.core.readNamespacedPodLog({
      name: target.pod,
      namespace: target.namespace,
      container: target.container,
      tailLines: count,
    }),
  );
  return text.split('\n').filter((line) => line.trim());
}

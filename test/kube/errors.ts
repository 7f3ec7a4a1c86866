import { qualifiedName, type ResourceType } from './types.js';

/**
 * Failures of API requests, answered as `Status` objects with the code, reason and message
 * wording of the real API server, so that clients can be tested on what they will really see.
 */

export interface StatusCause {
  reason: string;
  message: string;
  field: string;
}

export interface StatusDetails {
  name?: string;
  group?: string;
  kind?: string;
  uid?: string;
  causes?: StatusCause[];
}

export class ApiError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
    readonly details?: StatusDetails,
  ) {
    super(message);
  }

  toStatus(): object {
    return {
      kind: 'Status',
      apiVersion: 'v1',
      metadata: {},
      status: 'Failure',
      message: this.message,
      reason: this.reason,
      ...(this.details ? { details: this.details } : {}),
      code: this.code,
    };
  }
}

/** The Status a successful immediate delete answers with. */
export function successStatus(resource: ResourceType, name: string, uid: string): object {
  return {
    kind: 'Status',
    apiVersion: 'v1',
    metadata: {},
    status: 'Success',
    details: { name, group: resource.group, kind: resource.plural, uid },
  };
}

export function notFound(resource: ResourceType, name: string): ApiError {
  return new ApiError(404, 'NotFound', `${qualifiedName(resource)} "${name}" not found`, {
    name,
    group: resource.group,
    kind: resource.plural,
  });
}

export function alreadyExists(resource: ResourceType, name: string): ApiError {
  return new ApiError(409, 'AlreadyExists', `${qualifiedName(resource)} "${name}" already exists`, {
    name,
    group: resource.group,
    kind: resource.plural,
  });
}

export function invalid(resource: ResourceType, name: string, causes: StatusCause[]): ApiError {
  const listed = causes.map((c) => `${c.field}: ${c.message}`);
  const summary = listed.length === 1 ? listed[0] : `[${listed.join(', ')}]`;
  const kind = resource.group ? `${resource.kind}.${resource.group}` : resource.kind;
  return new ApiError(422, 'Invalid', `${kind} "${name}" is invalid: ${summary}`, {
    name,
    group: resource.group,
    kind: resource.kind,
    causes,
  });
}

export function forbidden(
  user: string,
  verb: string,
  resource: ResourceType,
  subresource: string | undefined,
  namespace: string | undefined,
  name: string | undefined,
): ApiError {
  const subject = name ? `${qualifiedName(resource)} "${name}"` : qualifiedName(resource);
  const what = subresource ? `${resource.plural}/${subresource}` : resource.plural;
  const scope = namespace ? ` in the namespace "${namespace}"` : ' at the cluster scope';
  return new ApiError(
    403,
    'Forbidden',
    `${subject} is forbidden: User "${user}" cannot ${verb} resource "${what}" in API group "${resource.group}"${scope}`,
    { ...(name ? { name } : {}), group: resource.group, kind: resource.plural },
  );
}

export function unauthorized(): ApiError {
  return new ApiError(401, 'Unauthorized', 'Unauthorized');
}

export function badRequest(message: string): ApiError {
  return new ApiError(400, 'BadRequest', message);
}

export function methodNotAllowed(): ApiError {
  return new ApiError(
    405,
    'MethodNotAllowed',
    'the server does not allow this method on the requested resource',
  );
}

export function expired(message: string): ApiError {
  return new ApiError(410, 'Expired', message);
}

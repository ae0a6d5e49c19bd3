"""The twisted.web adapter: the wrapping resource, the per-request filter, guest threads, proxy."""

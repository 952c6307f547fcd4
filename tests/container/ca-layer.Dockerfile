# TEST ONLY, never part of the product image. Over a Debian root filesystem made by
# debootstrap (nothing can be pulled on the CI machine), add the machine's own extra CA
# certificates so that apt and pip inside the product build reach the package mirrors.
ARG ROOTFS
FROM ${ROOTFS}
COPY certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# pip uses its own CA bundle unless told otherwise.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

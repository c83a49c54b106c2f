/* musl's getaddrinfo, for TestDNSCapturedLibc: musl asks every nameserver
 * of /etc/resolv.conf at once from one unconnected UDP socket (sendto) and
 * takes an answer only from a nameserver it asked. Prints the name's IPv4
 * addresses, one line. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>

int main(int argc, char **argv)
{
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *res, *r;
	if (argc != 2) {
		fprintf(stderr, "usage: musl-resolve NAME\n");
		return 2;
	}
	int err = getaddrinfo(argv[1], NULL, &hints, &res);
	if (err) {
		fprintf(stderr, "getaddrinfo %s: %s\n", argv[1], gai_strerror(err));
		return 1;
	}
	for (r = res; r; r = r->ai_next) {
		char buf[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &((struct sockaddr_in *)r->ai_addr)->sin_addr, buf, sizeof(buf));
		printf("%s%s", buf, r->ai_next ? " " : "\n");
	}
	freeaddrinfo(res);
	return 0;
}

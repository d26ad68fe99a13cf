/* Preloaded into the simulated board's twin (host_tests/simboard.py).
 * The unix port's REPL switches the terminal to raw mode with TCSAFLUSH,
 * which throws away input that arrived before: mpremote's "enter the raw
 * REPL" sent right after its Ctrl-C is lost when main.py takes a moment to
 * stop. A board keeps that input; with this, the simulated board does too
 * (TCSAFLUSH becomes TCSANOW, nothing else changes). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <termios.h>

int tcsetattr(int fd, int action, const struct termios *t) {
    static int (*real)(int, int, const struct termios *);
    if (!real) {
        real = (int (*)(int, int, const struct termios *))dlsym(RTLD_NEXT, "tcsetattr");
    }
    return real(fd, action == TCSAFLUSH ? TCSANOW : action, t);
}

// A vCenter simulator for tests/test_drivers_vmware.py, built from Debian's
// golang-github-vmware-govmomi-dev (govmomi 0.24) in the test's set-up:
//
//	GO111MODULE=off GOPATH=<scratch>:/usr/share/gocode go build -o vcsim main.go
//
// It serves simulator.VPX() over plain HTTP on -listen (accepting only the
// -login user:password when given, else any) and prints
// "LISTENING <url>" on stdout once it accepts.  govmomi 0.24 lacks two calls
// the driver makes, so the SDK handler is wrapped:
//   - AcquireTicket is answered with a VirtualMachineTicket built from the
//     simulated VM (its vmx path, its host's name) or with InvalidState when
//     the VM is powered off, as vCenter does;
//   - FindAllByUuid is served by the simulator's FindByUuid (same request
//     fields, and a reply of zero or one reference has the same shape).
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// The SHA-1 thumbprint every simulated host's authd "has".
const thumbprint = "6F:E1:3A:0C:52:9D:44:B7:21:8E:A0:33:7C:19:D5:E2:90:4B:6A:1F"

type acquireTicket struct {
	This       string `xml:"_this"`
	TicketType string `xml:"ticketType"`
}

func findAcquireTicket(body []byte) *acquireTicket {
	decoder := xml.NewDecoder(bytes.NewReader(body))
	for {
		token, err := decoder.Token()
		if err != nil {
			return nil
		}
		if start, ok := token.(xml.StartElement); ok && start.Name.Local == "AcquireTicket" {
			request := new(acquireTicket)
			if decoder.DecodeElement(request, &start) != nil {
				return nil
			}
			return request
		}
	}
}

const envelope = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

func answerTicket(w http.ResponseWriter, request *acquireTicket) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: request.This}
	vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	if !ok || vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOn {
		w.WriteHeader(http.StatusInternalServerError)
		fault := `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The attempted operation cannot be performed in the current state (Powered off).</faultstring><detail><InvalidStateFault xmlns="urn:vim25" xsi:type="InvalidState"></InvalidStateFault></detail></soapenv:Fault>`
		fmt.Fprintf(w, envelope, fault)
		return
	}
	host := simulator.Map.Get(*vm.Runtime.Host).(*simulator.HostSystem)
	port := 902
	if request.TicketType == "webmks" {
		port = 443
	}
	secret := make([]byte, 16)
	rand.Read(secret)
	var text bytes.Buffer
	xml.EscapeText(&text, []byte(vm.Config.Files.VmPathName))
	ticket := fmt.Sprintf(`<AcquireTicketResponse xmlns="urn:vim25"><returnval><ticket>%s</ticket><cfgFile>%s</cfgFile><host>%s</host><port>%d</port><sslThumbprint>%s</sslThumbprint></returnval></AcquireTicketResponse>`,
		hex.EncodeToString(secret), text.String(), host.Name, port, thumbprint)
	fmt.Fprintf(w, envelope, ticket)
}

func wrap(sdk http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := ioutil.ReadAll(r.Body)
		if request := findAcquireTicket(body); request != nil {
			answerTicket(w, request)
			return
		}
		findAll := bytes.Contains(body, []byte("<FindAllByUuid"))
		if findAll {
			body = bytes.ReplaceAll(body, []byte("FindAllByUuid"), []byte("FindByUuid"))
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		if !findAll {
			sdk.ServeHTTP(w, r)
			return
		}
		recorder := httptest.NewRecorder()
		sdk.ServeHTTP(recorder, r)
		for key, values := range recorder.Header() {
			w.Header()[key] = values
		}
		reply := bytes.ReplaceAll(recorder.Body.Bytes(), []byte("FindByUuidResponse"), []byte("FindAllByUuidResponse"))
		w.Header().Del("Content-Length")
		w.WriteHeader(recorder.Code)
		w.Write(reply)
	})
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	login := flag.String("login", "", "user:password the only login accepted (default: any)")
	flag.Parse()
	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	model.Service.Listen = &url.URL{Host: *listen}
	if user, password, ok := strings.Cut(*login, ":"); ok {
		model.Service.Listen.User = url.UserPassword(user, password)
	}
	server := model.Service.NewServer()
	// Served per request, so replacing it before anyone knows the URL is safe.
	server.Config.Handler = wrap(server.Config.Handler)
	address := *server.URL
	address.User = nil
	fmt.Printf("LISTENING %s\n", address.String())
	os.Stdout.Sync()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	server.Close()
}
